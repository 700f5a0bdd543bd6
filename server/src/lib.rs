//! orgpulse-server: a real-time event server. Writes go through the Store (entity change and event
//! in one transaction), committed events travel on the Bus to each node's Hub, and the Hub fans them
//! out to subscribers in seq order. See docs/design.md for the data flow.
pub mod activity;
pub mod admission;
pub mod audience;
pub mod auth;
pub mod bus;
pub mod config;
pub mod connections;
pub mod cursor;
pub mod dev;
pub mod hub;
pub mod jwks;
pub mod log_limit;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod request_gate;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod user_slots;
pub mod validate;
pub mod web;
