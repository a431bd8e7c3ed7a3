//! The pure logic of the product: no actors, no I/O.

pub mod decode;
pub mod lists;
pub mod partition_state;
pub mod route;
pub mod tables;
pub mod watermark;
pub mod window;
