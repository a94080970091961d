//! Images of `image_url` parts: `data:` URIs (base64) and `http(s)` URLs fetched with size and time
//! limits. Runs on a blocking thread.

use std::io::Read;
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine;
use vlm::Image;
use vlm::processing::ImageLimits;

use crate::openai::ApiError;

/// Limits on fetched and decoded images.
#[derive(Debug, Clone)]
pub struct ImageFetch {
    pub max_bytes: usize,
    pub timeout: Duration,
    /// Most pixels of one image (`--max-image-pixels`).
    pub limits: ImageLimits,
    /// Most pixels of all images of one request together (`--max-request-pixels`).
    pub max_request_pixels: u64,
}

impl ImageFetch {
    /// Fetches and decodes one image, counting its pixels against what is left of the request's
    /// budget (`budget`) before any pixel is decoded: a small file can hold a huge image.
    pub fn load(&self, url: &str, budget: &mut u64) -> Result<Image, ApiError> {
        let bytes = if let Some(data) = url.strip_prefix("data:") {
            self.decode_data_uri(data)?
        } else if url.starts_with("http://") || url.starts_with("https://") {
            self.fetch(url)?
        } else {
            return Err(ApiError::invalid("image_url must be a data: URI or an http(s) URL"));
        };
        let (width, height) = Image::dimensions_of(&bytes).map_err(ApiError::from)?;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.limits.max_pixels {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "image_too_large",
                format!(
                    "an image of {width}x{height} = {pixels} pixels is over the limit of {} pixels per image (--max-image-pixels)",
                    self.limits.max_pixels
                ),
            ));
        }
        if pixels > *budget {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "images_too_large",
                format!(
                    "the request's images have more than {} pixels together (--max-request-pixels)",
                    self.max_request_pixels
                ),
            ));
        }
        *budget -= pixels;
        Image::from_bytes_with_limits(&bytes, &self.limits).map_err(ApiError::from)
    }

    fn decode_data_uri(&self, data: &str) -> Result<Vec<u8>, ApiError> {
        let (header, payload) =
            data.split_once(',').ok_or_else(|| ApiError::invalid("malformed data URI: no comma"))?;
        if !header.ends_with(";base64") {
            return Err(ApiError::invalid("data URIs must be base64-encoded"));
        }
        if payload.len() / 4 * 3 > self.max_bytes {
            return Err(too_large(self.max_bytes));
        }
        base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| ApiError::invalid(format!("malformed base64 image: {e}")))
    }

    fn fetch(&self, url: &str) -> Result<Vec<u8>, ApiError> {
        let agent = ureq::AgentBuilder::new().timeout(self.timeout).build();
        let response = agent.get(url).call().map_err(|e| ApiError::invalid(format!("cannot fetch {url}: {e}")))?;
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(self.max_bytes as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ApiError::invalid(format!("cannot fetch {url}: {e}")))?;
        if bytes.len() > self.max_bytes {
            return Err(too_large(self.max_bytes));
        }
        Ok(bytes)
    }
}

fn too_large(max_bytes: usize) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "image_too_large",
        format!("image over the {max_bytes}-byte limit"),
    )
}
