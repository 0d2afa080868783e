//! Siemens S7 (S7comm over ISO-on-TCP). No async S7 crate is usable today (FINDINGS.md:
//! s7-client lacks PDU splitting and typed areas, snap7-client sends malformed writes, rust7
//! blocks), so Nexus has its own client. This module holds the protocol codec, tested at the
//! byte level; the driver on top of it (planner, pool, reads and writes) is the next step of
//! the OPC UA/S7 issue.

pub mod proto;
