//! Helpers shared by the integration test binaries that include `mod common;`.

pub mod nbd;
