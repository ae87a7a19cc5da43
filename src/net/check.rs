//! Host readiness for the sandbox network.
