//! `bridge-guard status`: what the running agent knows about each guarded bridge and port.

use std::path::PathBuf;

use crate::status::Status;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the agent's state as JSON.
    #[arg(long)]
    json: bool,
    /// The agent's state directory (its --state-dir).
    #[arg(long, value_name = "DIR", default_value = "/run/bridge-guard")]
    state_dir: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let status = Status::read(&args.state_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        print!(
            "{}",
            status.render(u64::try_from(now.as_nanos()).unwrap_or(0))
        );
    }
    Ok(())
}
