//! `keel group list|describe|delete|reset-offsets`. The arguments are final; the broker side of
//! consumer groups is not there yet, so every command fails (exit 1) after parsing.

use anyhow::{Result, bail};
use clap::{ArgGroup, Args, Subcommand};

use crate::common::{ClientOpts, ListArgs, parse_timestamp};
use crate::output::OutputOpts;

/// The one message for everything that needs consumer groups.
pub const GROUPS_UNAVAILABLE: &str = "consumer groups are not available yet";

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups.
    List(ListArgs),
    /// Show a group's state, members, committed offsets and lag.
    Describe(DescribeArgs),
    /// Delete a group and its committed offsets (it must have no active members).
    Delete(DeleteArgs),
    /// Move a group's committed offsets for a topic (it must have no active members).
    ResetOffsets(ResetArgs),
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Group id.
    pub group: String,
    #[command(flatten)]
    pub output: OutputOpts,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Group id.
    pub group: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("to")
        .required(true)
        .args(["to_earliest", "to_latest", "to_offset", "to_timestamp"])
))]
pub struct ResetArgs {
    /// Group id.
    pub group: String,
    /// Topic whose offsets to reset (every partition of it).
    #[arg(long)]
    pub topic: String,
    /// To the oldest retained record.
    #[arg(long)]
    pub to_earliest: bool,
    /// To the end (the high watermark).
    #[arg(long)]
    pub to_latest: bool,
    /// To this offset.
    #[arg(long, value_name = "N")]
    pub to_offset: Option<u64>,
    /// To the first record at or after this time: milliseconds since the epoch or RFC 3339.
    #[arg(long, value_name = "TS", value_parser = parse_timestamp)]
    pub to_timestamp: Option<i64>,
    #[command(flatten)]
    pub client: ClientOpts,
}

pub async fn run(cmd: GroupCommand) -> Result<()> {
    match cmd {
        GroupCommand::List(_)
        | GroupCommand::Describe(_)
        | GroupCommand::Delete(_)
        | GroupCommand::ResetOffsets(_) => bail!(GROUPS_UNAVAILABLE),
    }
}
