//! Store backends. The trait and its records are [`postern_core::store`]; this module holds
//! the embedded default, SQLite ([`sqlite::SqliteStore`]).

pub mod sqlite;

pub use postern_core::store::*;
