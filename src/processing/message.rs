//! Conversations: messages of interleaved text, images and videos.

use serde::Serialize;

use super::image::Image;
use super::video::Video;

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the whole conversation.
    System,
    /// The person asking.
    User,
    /// The model.
    Assistant,
}

/// One part of a message.
#[derive(Debug, Clone)]
pub enum Content {
    /// Text, passed to the chat template as written.
    Text(String),
    /// An image, at this position among the text parts.
    Image(Image),
    /// A video, as frames (Qwen-VL checkpoints).
    Video(Video),
}

/// An image or a video of a conversation: what the vision tower sees.
#[derive(Debug, Clone, Copy)]
pub enum Media<'a> {
    /// An image.
    Image(&'a Image),
    /// A video.
    Video(&'a Video),
}

/// A message: a role and its parts in order, so `.image(a).text("vs").image(b)` keeps that order.
///
/// ```no_run
/// use vlm::{Image, Message};
/// let message = Message::user().image(Image::open("street.jpg")?).text("What is happening here?");
/// # Ok::<(), vlm::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said, in order.
    pub content: Vec<Content>,
}

impl Message {
    /// An empty message from `role`.
    pub fn new(role: Role) -> Self {
        Self { role, content: Vec::new() }
    }

    /// An empty system message.
    pub fn system() -> Self {
        Self::new(Role::System)
    }

    /// An empty user message.
    pub fn user() -> Self {
        Self::new(Role::User)
    }

    /// An empty assistant message (for earlier turns of a conversation).
    pub fn assistant() -> Self {
        Self::new(Role::Assistant)
    }

    /// Appends text.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.content.push(Content::Text(text.into()));
        self
    }

    /// Appends an image.
    pub fn image(mut self, image: Image) -> Self {
        self.content.push(Content::Image(image));
        self
    }

    /// Appends a video.
    pub fn video(mut self, video: Video) -> Self {
        self.content.push(Content::Video(video));
        self
    }

    /// The images of the message, in order.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.content.iter().filter_map(|part| match part {
            Content::Image(image) => Some(image),
            Content::Text(_) | Content::Video(_) => None,
        })
    }

    /// The images and videos of the message, in order.
    pub fn media(&self) -> impl Iterator<Item = Media<'_>> {
        self.content.iter().filter_map(|part| match part {
            Content::Image(image) => Some(Media::Image(image)),
            Content::Video(video) => Some(Media::Video(video)),
            Content::Text(_) => None,
        })
    }
}
