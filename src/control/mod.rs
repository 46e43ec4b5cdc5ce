//! The control socket: dmsetup's verbs for a running daemon.
//!
//! Protocol (one request per connection): the client sends one line of
//! space-separated words (`status`, `status --json`, `message enable_hydration`,
//! `table`, `events`, ...). The server answers `ok` or `error <reason>` on the
//! first line; after `ok` comes the payload, then the server closes the
//! connection. `events` keeps the connection open and sends one JSON object per
//! line until the client hangs up.

mod client;
mod server;

pub use client::{request, stream, ControlClientError};
pub use server::{ControlHandler, ControlServer, ControlServerError};
