//! Durable storage for task records: SQLite (embedded) today.

pub mod sqlite;
