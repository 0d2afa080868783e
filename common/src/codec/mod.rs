//! Payload codecs: the contract's JSON value object and Sparkplug B protobuf.

pub mod json;
pub mod payload;
pub mod sparkplug;

pub use json::{
    decode_bare_value, decode_value_object, encode_value_object, PayloadError, ValueObject,
};
