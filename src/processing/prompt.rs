//! Image placeholders: how each image appears in the rendered prompt, and the token text it is
//! expanded to before tokenization.

use super::Visual;
use crate::error::{Error, Result};

/// `rendered` with its `i`-th `placeholder` replaced by `expansion(&visuals[i])`: an
/// [`Error::ImageCount`] unless there are exactly as many placeholders as images.
pub(crate) fn expand_each(
    rendered: &str,
    placeholder: &str,
    visuals: &[Visual],
    mut expansion: impl FnMut(&Visual) -> Result<String>,
) -> Result<String> {
    let placeholders = rendered.matches(placeholder).count();
    if placeholders != visuals.len() {
        return Err(Error::ImageCount { images: visuals.len(), placeholders });
    }
    let mut text = String::with_capacity(rendered.len());
    let mut pieces = rendered.split(placeholder);
    text.push_str(pieces.next().unwrap_or_default());
    for (visual, piece) in visuals.iter().zip(pieces) {
        text.push_str(&expansion(visual)?);
        text.push_str(piece);
    }
    Ok(text)
}

/// The marker OpenGVLab's code writes for an image before expanding it.
pub const IMAGE_MARKER: &str = "<image>";

/// How a checkpoint's prompts carry images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePlaceholders {
    /// transformers' InternVLProcessor: the chat template writes `context` once per image; each
    /// becomes `start` + `context` x (256 x tiles) + `end`.
    Transformers {
        /// `<img>`
        start: String,
        /// `<IMG_CONTEXT>`
        context: String,
        /// `</img>`
        end: String,
    },
    /// OpenGVLab's InternVL `model.chat`: `<image>\n` markers in the text (`Image-k: <image>\n` when
    /// a conversation has several) become `<img>` + `<IMG_CONTEXT>` x (256 x tiles) + `</img>`.
    InternVl,
    /// NVLM-D: markers as InternVL; an image becomes `<Image>`, then per tile a tag (`<tile_1>`,
    /// ..., `<tile_global_thumbnail>` last) followed by 256 `<|vision_pad|>`, then `</Image>`.
    NvlmD,
}

impl ImagePlaceholders {
    /// Whether messages reach the chat template as structured parts (`[{"type": "image"}, ...]`)
    /// rather than one string with markers.
    pub fn structured_content(&self) -> bool {
        matches!(self, ImagePlaceholders::Transformers { .. })
    }

    /// The text a placeholder is found as in the rendered prompt.
    pub fn placeholder(&self) -> &str {
        match self {
            ImagePlaceholders::Transformers { context, .. } => context,
            ImagePlaceholders::InternVl | ImagePlaceholders::NvlmD => IMAGE_MARKER,
        }
    }

    /// What the `index`-th (0-based) of `count` images writes into a string message.
    pub fn marker_text(&self, index: usize, count: usize) -> String {
        if count > 1 { format!("Image-{}: {IMAGE_MARKER}\n", index + 1) } else { format!("{IMAGE_MARKER}\n") }
    }

    /// The text one image of `tiles` tiles expands to.
    pub fn image_text(&self, tiles: usize, tokens_per_tile: usize) -> String {
        match self {
            ImagePlaceholders::Transformers { start, context, end } => {
                format!("{start}{}{end}", context.repeat(tiles * tokens_per_tile))
            }
            ImagePlaceholders::InternVl => format!("<img>{}</img>", "<IMG_CONTEXT>".repeat(tiles * tokens_per_tile)),
            ImagePlaceholders::NvlmD => {
                let pads = "<|vision_pad|>".repeat(tokens_per_tile);
                let mut text = String::from("<Image>");
                for tile in 1..tiles {
                    text.push_str(&format!("<tile_{tile}>{pads}"));
                }
                text.push_str(&format!("<tile_global_thumbnail>{pads}</Image>"));
                text
            }
        }
    }

    /// Replaces the placeholders of `rendered`, in order, with the expansion of each image.
    /// Fails when their number differs from the number of images.
    pub fn expand(&self, rendered: &str, tiles_per_image: &[usize], tokens_per_tile: usize) -> Result<String> {
        let pieces: Vec<&str> = rendered.split(self.placeholder()).collect();
        let placeholders = pieces.len() - 1;
        if placeholders != tiles_per_image.len() {
            return Err(Error::ImageCount { images: tiles_per_image.len(), placeholders });
        }
        let mut text = String::with_capacity(rendered.len());
        for (piece, &tiles) in pieces.iter().zip(tiles_per_image) {
            text.push_str(piece);
            text.push_str(&self.image_text(tiles, tokens_per_tile));
        }
        text.push_str(pieces[placeholders]);
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvlm_tile_tags_end_with_the_thumbnail() {
        let text = ImagePlaceholders::NvlmD.image_text(3, 1);
        assert_eq!(
            text,
            "<Image><tile_1><|vision_pad|><tile_2><|vision_pad|><tile_global_thumbnail><|vision_pad|></Image>"
        );
        assert_eq!(ImagePlaceholders::NvlmD.image_text(1, 1), "<Image><tile_global_thumbnail><|vision_pad|></Image>");
    }

    #[test]
    fn placeholder_count_must_match_images() {
        let style = ImagePlaceholders::InternVl;
        assert_eq!(style.expand("a <image>\nb", &[1], 2).unwrap(), "a <img><IMG_CONTEXT><IMG_CONTEXT></img>\nb");
        assert!(matches!(
            style.expand("a <image> <image>", &[1], 2),
            Err(Error::ImageCount { images: 1, placeholders: 2 })
        ));
        assert!(matches!(style.expand("no images", &[1], 2), Err(Error::ImageCount { images: 1, placeholders: 0 })));
    }
}
