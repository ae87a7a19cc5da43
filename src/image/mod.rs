//! Base images: the default guest and imported disk images.
pub mod default_guest;
pub mod manifest;
pub mod store;
