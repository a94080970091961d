//! A video clip as decoded frames (no codec dependency): the frames the model should see, in
//! order, and the rate they were sampled at. Frames are used as given, as transformers does with
//! `do_sample_frames=False`; sample them (e.g. at the 2-4 fps Cosmos-Reason recommends) before.

use std::path::Path;

use super::image::{Image, ImageLimits};
use crate::error::{Error, Result};

/// The most frames a clip may have (transformers' `max_frames` default).
pub const MAX_FRAMES: usize = 768;

/// A clip: frames of one size, sampled at `fps` frames per second.
#[derive(Debug, Clone)]
pub struct Video {
    frames: Vec<Image>,
    fps: f64,
}

impl Video {
    /// A clip from decoded frames. Fails on no frames, more than [`MAX_FRAMES`], frames of
    /// different sizes, or a rate that is not a positive number.
    pub fn from_frames(frames: Vec<Image>, fps: f64) -> Result<Self> {
        if frames.is_empty() {
            return Err(Error::Input("a video needs at least one frame".into()));
        }
        if frames.len() > MAX_FRAMES {
            return Err(Error::Input(format!("a video of {} frames is over the limit of {MAX_FRAMES}", frames.len())));
        }
        if !(fps.is_finite() && fps > 0.0) {
            return Err(Error::Input(format!("a video's frame rate must be a positive number, got {fps}")));
        }
        let (width, height) = (frames[0].width(), frames[0].height());
        if let Some((index, frame)) =
            frames.iter().enumerate().find(|(_, frame)| (frame.width(), frame.height()) != (width, height))
        {
            return Err(Error::Input(format!(
                "video frame {index} is {}x{}, frame 0 is {width}x{height}: every frame must have one size",
                frame.width(),
                frame.height()
            )));
        }
        Ok(Self { frames, fps })
    }

    /// Reads every image file of a directory, in file-name order, as the frames of a clip
    /// sampled at `fps`.
    pub fn open_dir(dir: impl AsRef<Path>, fps: f64) -> Result<Self> {
        let dir = dir.as_ref();
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    ["png", "jpg", "jpeg", "webp", "bmp", "gif"].contains(&e.to_ascii_lowercase().as_str())
                })
            })
            .collect();
        paths.sort();
        if paths.len() > MAX_FRAMES {
            return Err(Error::Input(format!(
                "{} holds {} frames, over the limit of {MAX_FRAMES}",
                dir.display(),
                paths.len()
            )));
        }
        let limits = ImageLimits::default();
        let frames = paths.iter().map(|path| Image::open_with_limits(path, &limits)).collect::<Result<Vec<_>>>()?;
        Self::from_frames(frames, fps)
    }

    /// The frames, in order.
    pub fn frames(&self) -> &[Image] {
        &self.frames
    }

    /// Frames per second of the clip as given.
    pub fn fps(&self) -> f64 {
        self.fps
    }

    /// Width of every frame.
    pub fn width(&self) -> u32 {
        self.frames[0].width()
    }

    /// Height of every frame.
    pub fn height(&self) -> u32 {
        self.frames[0].height()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(width: u32, height: u32) -> Image {
        Image::from_rgb8(width, height, vec![0; (width * height * 3) as usize]).unwrap()
    }

    #[test]
    fn bad_clips_are_input_errors() {
        assert!(matches!(Video::from_frames(vec![], 2.0), Err(Error::Input(_))));
        assert!(
            matches!(Video::from_frames(vec![frame(4, 4), frame(4, 5)], 2.0), Err(Error::Input(m)) if m.contains("frame 1"))
        );
        assert!(matches!(Video::from_frames(vec![frame(4, 4)], 0.0), Err(Error::Input(_))));
        assert!(matches!(Video::from_frames(vec![frame(4, 4)], f64::NAN), Err(Error::Input(_))));
        assert_eq!(Video::from_frames(vec![frame(4, 4); 3], 2.0).unwrap().frames().len(), 3);
    }
}
