//! `postern cluster init`: make the keys a cluster of gateways shares (crate::cluster).

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use crate::cluster::{AGENT_CA, AUDIT_SIGNING, HOST_CA, Outcome, USER_CA};

#[derive(Subcommand)]
pub enum ClusterAction {
    /// Make the cluster's keys (agent CA, SSH host CA, audit signing key, RDP token key, SSH
    /// user CA) in
    /// the store named by [store] url, sealed with the [cluster] master key. Keys already there
    /// are kept, so it is safe to run again; it also checks they open with this master key.
    #[command(
        after_help = "Examples:\n  postern audit keygen /etc/postern/cluster.key\n  postern cluster init --config gateway.toml\n\n\
                      The config needs [store] url (PostgreSQL) and [cluster] key_file (or key_command).\n\
                      Then start every gateway with that store, that master key and its own [cluster] gateway_id."
    )]
    Init {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run `action` with the configuration the command line names.
pub async fn run(cfg: &crate::config::GatewayConfig, action: &ClusterAction) -> anyhow::Result<i32> {
    let ClusterAction::Init { json } = action;
    let Some(url) = cfg.store.url.as_deref() else {
        anyhow::bail!(
            "postern cluster init needs the store the cluster shares: give --config with [store] url = \"postgres://...\""
        );
    };
    let keyring = crate::cluster::keyring(&cfg.cluster)?;
    let master = keyring
        .active()
        .context("postern cluster init needs the cluster master key: set [cluster] key_file (create one with `postern audit keygen FILE`) or key_command")?
        .key_id()
        .to_owned();
    let store = crate::store::open(Some(url), &cfg.data_dir).await?;
    let (report, keys) = crate::cluster::init(store.as_ref(), &keyring).await?;
    let host_ca = keys.host_ca.public_key().to_openssh().context("encoding the host CA")?;
    let user_ca = keys.user_ca.public_key().to_openssh().context("encoding the user CA")?;
    let facts = |name: &str| -> anyhow::Result<String> {
        Ok(match name {
            AGENT_CA => format!("pin {}", keys.agent_ca.pin()),
            HOST_CA => host_ca.clone(),
            USER_CA => user_ca.clone(),
            AUDIT_SIGNING => format!("public key {}", keys.audit_public_hex()?),
            _ => String::new(),
        })
    };
    let store_name = crate::store::postgres::describe(url);
    if *json {
        let mut list = Vec::new();
        for (name, outcome) in &report {
            list.push(json!({"name": name, "outcome": outcome, "public": facts(name)?}));
        }
        println!("{}", json!({"store": store_name, "master_key": master, "keys": list}));
        return Ok(0);
    }
    println!("cluster keys in {store_name}, sealed with master key {master}:");
    for (name, outcome) in &report {
        let what = match outcome {
            Outcome::Created => "created",
            Outcome::Kept => "kept",
        };
        println!("  {name:<14} {what:<8} {}", facts(name)?);
    }
    println!(
        "Start every gateway with this [store] url, the same [cluster] master key and its own [cluster] gateway_id."
    );
    Ok(0)
}
