//! The daemon: owns the store, the backend, every sandbox and the API socket.
pub mod bus;
pub mod manager;
pub mod reconcile;
