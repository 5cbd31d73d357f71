//! The Sheepdog peer protocol: everything two sheep (or dog and a sheep) agree on about
//! the wire and the inode layout, with no I/O. Object ids, the frame header, opcodes,
//! message bodies, error codes.

pub mod error;
pub mod frame;
pub mod inode;
pub mod msg;
pub mod oid;
pub mod opcode;
pub mod size;
pub mod sums;

pub use error::{ErrorCode, FrameError, PeerError};
pub use frame::Header;
pub use oid::{Oid, Vid};
pub use opcode::Opcode;
