//! The Sheepdog peer protocol: everything two sheep (or dog and a sheep) agree on about
//! the wire, with no I/O. Object ids, the frame header, opcodes, message bodies, errors.

pub mod oid;

pub use oid::{Oid, Vid};
