//! Payload codecs: the contract's JSON value object, Sparkplug B protobuf, and the formats of
//! other publishers (bare scalars, text, UMH, JSON-pointer mappings) chosen per topic filter.

pub mod json;
pub mod payload;
pub mod sparkplug;
pub mod sparkplug_host;

pub use json::{
    decode_bare_value, decode_value_object, encode_value_object, PayloadError, ValueObject,
};
