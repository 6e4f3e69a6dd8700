//! The `mcp-orchestrator` command line: thin glue over the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mcp_orchestrator::check::check_project;
use mcp_orchestrator::diagnostic::{self, Severity};

/// Exit codes shared by every subcommand.
const EXIT_OK: u8 = 0;
const EXIT_INVALID_PROJECT: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "mcp-orchestrator",
    version,
    about = "Declarative flow engine for conversational ordering assistants"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a flow project and report every problem, for CI and editors.
    Check(CheckArgs),
    /// Print the JSON Schema of the flow file format.
    Schema,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Project directory (holds `flows/` and `schemas/`).
    #[arg(env = "MCP_PROJECT_DIR", default_value = ".")]
    dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Treat warnings as errors.
    #[arg(long)]
    deny_warnings: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// rustc-style messages with the offending line.
    Human,
    /// One JSON array of diagnostics.
    Json,
    /// GitHub Actions annotations (`::error file=...,line=...::message`).
    Github,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            });
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Check(args) => check(args),
        Command::Schema => {
            let schema = mcp_orchestrator::spec::flow_file_json_schema();
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut stdout, &schema)?;
            writeln!(stdout)?;
            Ok(EXIT_OK)
        }
    }
}

fn check(args: CheckArgs) -> anyhow::Result<u8> {
    if !args.dir.is_dir() {
        anyhow::bail!("`{}` is not a directory", args.dir.display());
    }
    let environment = std::env::vars().collect();
    let mut checked = check_project(&args.dir, &environment);
    if args.deny_warnings {
        for diagnostic in &mut checked.diagnostics {
            diagnostic.severity = Severity::Error;
        }
    }
    let io_failure = checked
        .diagnostics
        .iter()
        .any(|d| d.code == diagnostic::Code::Io && d.is_error());
    let output = match args.format {
        Format::Human => {
            let color = std::io::stderr().is_terminal();
            diagnostic::render_human(&checked.diagnostics, &checked.sources, color)
        }
        Format::Json => diagnostic::render_json(&checked.diagnostics) + "\n",
        Format::Github => {
            // Annotations need paths relative to the repository checkout,
            // which is the working directory of a CI job.
            let current = std::env::current_dir().unwrap_or_default();
            let dir = args.dir.strip_prefix(&current).unwrap_or(&args.dir);
            diagnostic::render_github(&checked.diagnostics, dir)
        }
    };
    match args.format {
        Format::Human => eprint!("{output}"),
        _ => print!("{output}"),
    }
    let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
    Ok(if io_failure {
        EXIT_USAGE
    } else if errors > 0 {
        EXIT_INVALID_PROJECT
    } else {
        EXIT_OK
    })
}
