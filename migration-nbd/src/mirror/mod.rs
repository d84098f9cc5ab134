//! The mirror job (see [`machine`]).

pub mod machine;
