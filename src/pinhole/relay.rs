//! Relay backend.
