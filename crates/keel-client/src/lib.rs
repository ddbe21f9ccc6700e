//! Keel's async Rust client.
//!
//! A [`Client`] holds one HTTP/2 connection per broker and a cache of partition leaders. From it
//! come an [`Admin`] for topics and groups, a batching [`Producer`], [`Consumer`]s of assigned
//! partitions, and [`GroupConsumer`]s that share a subscription as members of a consumer group. Requests that any
//! broker can answer go to any broker; produce and fetch requests go to the partition leader,
//! following the leader hints brokers return and retrying retriable errors on their own.
//!
//! # Producing
//!
//! ```no_run
//! use keel_client::{Client, ProducerConfig, ProducerRecord};
//!
//! # async fn run() -> Result<(), keel_client::ClientError> {
//! let client = Client::connect(&["127.0.0.1:9292"]).await?;
//! client.admin().create_topic("orders", 3, 0, Default::default()).await?;
//!
//! let producer = client.producer(ProducerConfig::default())?;
//! // `send` queues the record and returns a future for its acknowledgement, so many records
//! // can be in flight at once.
//! let ack = producer
//!     .send(ProducerRecord::new("orders", "order #1").key("customer-7"))
//!     .await?;
//! let meta = ack.await?;
//! println!("written to partition {} at offset {:?}", meta.partition, meta.offset);
//! producer.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Consuming
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use keel_client::{Client, ConsumerConfig, SeekTo};
//!
//! # async fn run() -> Result<(), keel_client::ClientError> {
//! let client = Client::connect(&["127.0.0.1:9292"]).await?;
//! let mut consumer = client.consumer(ConsumerConfig::default());
//! consumer.assign(&[("orders", 0), ("orders", 1)]);
//! consumer.seek("orders", 0, SeekTo::Beginning).await?;
//! loop {
//!     for record in consumer.poll(Duration::from_secs(1)).await? {
//!         println!("{}/{} @{}: {:?}", record.topic, record.partition, record.offset, record.value);
//!     }
//! }
//! # }
//! ```
//!
//! Or follow one partition as a stream:
//!
//! ```no_run
//! use futures::StreamExt;
//! use keel_client::{Client, ConsumerConfig, SeekTo};
//!
//! # async fn run() -> Result<(), keel_client::ClientError> {
//! let client = Client::connect(&["127.0.0.1:9292"]).await?;
//! let consumer = client.consumer(ConsumerConfig::default());
//! let mut records = consumer.subscribe_stream("orders", 0, SeekTo::End);
//! while let Some(record) = records.next().await {
//!     let record = record?;
//!     println!("{}: {:?}", record.offset, record.value);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Consuming as a group
//!
//! Members of a group share the partitions of the topics they subscribe to; the group's
//! coordinator assigns them and keeps how far the group got (its committed offsets).
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use keel_client::{Client, GroupConfig, OffsetReset, RebalanceListener};
//!
//! struct Log;
//!
//! impl RebalanceListener for Log {
//!     fn on_assigned(&mut self, partitions: &[(String, u32)]) {
//!         println!("now consuming {partitions:?}");
//!     }
//! }
//!
//! # async fn run() -> Result<(), keel_client::ClientError> {
//! let client = Client::connect(&["127.0.0.1:9292"]).await?;
//! // `order.#` is a pattern: every topic named `order` or `order.<anything>`.
//! let config = GroupConfig::new("billing")
//!     .subscribe(["payments", "order.#"])
//!     .auto_offset_reset(OffsetReset::Earliest);
//! let mut consumer = client.group_consumer(config)?;
//! consumer.set_rebalance_listener(Box::new(Log));
//! for _ in 0..100 {
//!     // At least once: records are processed before the next `poll`, and auto-commit only
//!     // commits what earlier polls returned.
//!     for record in consumer.poll(Duration::from_secs(1)).await? {
//!         println!("{}/{} @{}", record.topic, record.partition, record.offset);
//!     }
//! }
//! // Commits, and leaves so the other members take over at once.
//! consumer.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Errors and retries
//!
//! Every failure is a [`ClientError`], mapped from the broker's `keel-error` reason.
//! [`ClientError::is_retriable`] tells leader changes and unreachable brokers from real
//! rejections, and [`ClientError::is_definite`] whether the failed request certainly had no
//! effect.

// First, so that the config modules can use its macro.
#[macro_use]
mod setters;

mod admin;
mod client;
mod consumer;
mod error;
mod group;
mod metadata;
mod partitioner;
mod producer;
mod retry;
mod rpc;
mod util;

pub use admin::Admin;
pub use client::{Client, ClientConfig, OffsetSpec};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, RecordStream, SeekTo};
pub use error::{ClientError, LeaderHint, Result};
pub use group::{CommitFuture, GroupConfig, GroupConsumer, RebalanceListener, ResetTo, is_pattern};
pub use keel_batch::Compression;
pub use keel_proto::v1::{
    BatchAck, BrokerInfo, CommittedOffset, DescribeClusterResponse, DescribeGroupResponse,
    GroupListing, GroupMember, GroupPartitionOffset, ListOffsetsResponse, PartitionInfo, TopicInfo,
    TopicPartitions,
};
pub use keel_types::ErrorReason;
pub use partitioner::{murmur2, partition_for_key};
pub use producer::{
    Acks, BatchPipeline, DeliveryFuture, MAX_IDEMPOTENT_IN_FLIGHT, Producer, ProducerConfig,
    ProducerRecord, RecordMetadata,
};
