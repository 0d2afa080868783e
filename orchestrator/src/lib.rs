//! # nexus-orchestrator
//!
//! The `nexus` binary and the orchestrator service.
//!
//! - [`status`]: the orchestrator service (`nexus orchestrator`, :5000): follows every retained
//!   `$nexus/status/#` topic and serves the platform's state at `GET /api/v1/status`.
//! - [`up`]: `nexus up` composes the platform in one process: embedded broker (with an
//!   internal service account for the services), then gateway, command handler, alert service,
//!   ingestion (when a database is configured) and the orchestrator, each supervised and
//!   restarted with backoff, drained within `orchestrator.shutdown_grace` on Ctrl-C/SIGTERM.
//! - [`cli`]: argument parsing and the one-service subcommands.

pub mod cli;
pub mod status;
pub mod up;
