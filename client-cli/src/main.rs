//! `orgpulse`: the command-line client. Parses the command line, builds a resilient
//! [`orgpulse::client::Client`], runs the command and turns failures into one stderr line and an
//! exit code per error class.
mod bench;
mod cli;
mod cursor;
mod error;
mod events;
mod jobs;
mod mint;
mod notify;
mod output;
mod presence;

use std::time::Duration;

use clap::{Parser, error::ErrorKind};
use orgpulse::client::{BackoffConfig, Client, ClientConfig, TokenSource};

use cli::{Cli, Command, Global, TokenCommand};
use error::CliError;
use output::Printer;

fn main() {
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // --help, --version, and the full help when no command was given
        if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            e.exit();
        }
        eprintln!("orgpulse: error: {}", one_line(&e.to_string()));
        std::process::exit(CliError::usage("").exit_code());
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let servers = endpoints(&cli.global);
    let tokenless = matches!(token_source(&cli.global), Ok(TokenSource::None));
    if let Err(e) = runtime.block_on(run(cli)) {
        let e = e.with_hint(&servers, tokenless);
        eprintln!("orgpulse: error: {e}");
        std::process::exit(e.exit_code());
    }
}

/// clap's multi-line usage error as one line: the message and its details, without the usage
/// block (`--help` has that).
fn one_line(clap_error: &str) -> String {
    let mut lines = clap_error.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut msg = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    for detail in lines.take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more")) {
        msg += if msg.ends_with(':') { " " } else { "; " };
        msg += detail;
    }
    msg + " (see --help)"
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let out = Printer::new(cli.global.json);
    match cli.command {
        Command::Token(TokenCommand::Mint {
            secret_file,
            private_key,
            org,
            user,
            roles,
            groups,
            ttl,
        }) => out.line(&mint::mint(
            mint::Signer::from_flags(secret_file.as_deref(), private_key.as_deref())?,
            org.as_deref(),
            &user,
            roles,
            groups,
            ttl,
        )?),
        Command::Watch(args) => {
            let client = client(&cli.global, Some(args.idle_timeout), false)?;
            events::watch(&client, args, &out).await
        }
        Command::Poll(args) => {
            let client = client(&cli.global, None, args.follow)?;
            events::poll(&client, args, &out).await
        }
        Command::Publish(args) => {
            events::publish(&client(&cli.global, None, false)?, args, &out).await
        }
        Command::Presence(cmd) => {
            presence::run(&client(&cli.global, None, false)?, cmd, &out).await
        }
        Command::Broadcast(args) => {
            presence::broadcast(&client(&cli.global, None, false)?, args).await
        }
        Command::Online(org) => events::online(&client(&cli.global, None, false)?, org, &out).await,
        Command::Jobs(cmd) => jobs::run(&client(&cli.global, None, false)?, cmd, &out).await,
        Command::Notify(cmd) => notify::run(&client(&cli.global, None, false)?, cmd, &out).await,
        Command::Bench(args) => bench::run(args, &cli.global.servers[0]).await,
    }
}

/// The client for the global options; `forever` retries unreachable servers without limit.
fn client(g: &Global, idle: Option<Duration>, forever: bool) -> Result<Client, CliError> {
    let defaults = ClientConfig::default();
    Ok(Client::new(ClientConfig {
        endpoints: endpoints(g),
        token: token_source(g)?,
        backoff: BackoffConfig {
            initial: g.backoff_initial,
            max: g.backoff_max,
        },
        call_attempts: if forever { u32::MAX } else { g.attempts.max(1) },
        call_timeout: g.timeout,
        idle_timeout: idle.unwrap_or(defaults.idle_timeout),
        ca_certificate: match &g.ca_cert {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                orgpulse::client::Error::Config(format!("--ca-cert {}: {e}", path.display()))
            })?),
            None => None,
        },
        ..defaults
    })?)
}

/// The `--server` URLs, without empty ones.
fn endpoints(g: &Global) -> Vec<String> {
    g.servers
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Where the token comes from: a flag beats the environment; ORGPULSE_TOKEN_FILE beats
/// ORGPULSE_TOKEN.
fn token_source(g: &Global) -> Result<TokenSource, CliError> {
    let flags = [
        g.token.is_some(),
        g.token_file.is_some(),
        g.token_command.is_some(),
    ];
    if flags.iter().filter(|given| **given).count() > 1 {
        return Err(CliError::usage(
            "give only one of --token, --token-file and --token-command",
        ));
    }
    let env = |var| {
        std::env::var(var)
            .ok()
            .filter(|v: &String| !v.trim().is_empty())
    };
    Ok(if let Some(cmd) = &g.token_command {
        TokenSource::Command(cmd.clone())
    } else if let Some(file) = &g.token_file {
        TokenSource::File(file.clone())
    } else if let Some(t) = &g.token {
        TokenSource::Static(t.clone())
    } else if let Some(file) = env("ORGPULSE_TOKEN_FILE") {
        TokenSource::File(file.into())
    } else if let Some(t) = env("ORGPULSE_TOKEN") {
        TokenSource::Static(t)
    } else {
        TokenSource::None
    })
}
