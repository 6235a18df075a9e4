//! How does Envoy encode what it hands to the filter? Header-map pairs and
//! `google.protobuf.Struct`.

pub mod pairs;
pub mod structs;
