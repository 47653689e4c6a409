//! The sans-IO session core.
