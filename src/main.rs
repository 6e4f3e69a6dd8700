//! The `mcp-orchestrator` command line: thin glue over the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mcp_orchestrator::diagnostic::{self, Severity};

/// mimalloc: the request path allocates many small, short-lived objects
/// from several threads; with glibc's malloc, allocation was about a
/// quarter of a turn's instructions (`bench/profile`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Serve the flow project behind `POST /orchestrate`, `/mcp` and `GET /health`.
    Serve(Box<ServeArgs>),
    /// Check a flow project and report every problem, for CI and editors.
    Check(CheckArgs),
    /// Run the conversation tests in `flows/tests/`, with stubbed services.
    Test(TestArgs),
    /// Print the JSON Schema of the flow file format.
    Schema(SchemaArgs),
    /// Draw the flows as a graph: intent → flow → steps, with branches,
    /// `on_error` edges and replies with their routes.
    Graph(GraphArgs),
}

#[derive(Debug, clap::Args)]
struct GraphArgs {
    /// Project directory (holds `flows/` and `schemas/`).
    #[arg(env = "MCP_PROJECT_DIR", default_value = ".")]
    dir: PathBuf,
    /// Only this flow (and the intents that run it).
    #[arg(long)]
    flow: Option<String>,
    /// Mermaid (for READMEs and GitHub), DOT (for Graphviz) or SVG.
    #[arg(long, value_enum, default_value_t = GraphOutput::Mermaid)]
    format: GraphOutput,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GraphOutput {
    Mermaid,
    Dot,
    Svg,
}

#[derive(Debug, clap::Args)]
struct SchemaArgs {
    /// Print the schema of conversation-test files instead.
    #[arg(long)]
    tests: bool,
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// Project directory (holds `flows/` and `schemas/`), or a deployment
    /// of several tenants (`tenants/<name>/flows/…`).
    #[arg(env = "MCP_PROJECT_DIR", default_value = ".")]
    dir: PathBuf,
    /// In a deployment of several tenants, only this one.
    #[arg(long)]
    tenant: Option<String>,
    /// Run only the cases whose name contains this text (no golden set).
    #[arg(long, conflicts_with = "golden_only")]
    filter: Option<String>,
    /// Run only the golden sets: the classifiers' accuracy, per intent,
    /// and the intents taken for one another.
    #[arg(long)]
    golden_only: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = TestFormat::Human)]
    format: TestFormat,
    /// Write the report to this file instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
    /// List every flow step and route that no case reached.
    #[arg(long)]
    coverage: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TestFormat {
    Human,
    /// JUnit XML, for CI systems.
    Junit,
    /// GitHub Actions annotations at the test file's line.
    Github,
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
    /// In a deployment of several tenants, only this one.
    #[arg(long)]
    tenant: Option<String>,
    /// Also ask the server of every `kind: mcp` service for its tools: a
    /// tool it does not serve, or a call's arguments its schema refuses,
    /// is an error.
    #[arg(long)]
    online: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Project directory (holds `flows/` and `schemas/`).
    #[arg(long, env = "MCP_PROJECT_DIR", default_value = ".")]
    project_dir: PathBuf,
    /// TCP port to listen on (all interfaces).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// `production` refuses to start while a service URL or a `${VAR}` is unset.
    #[arg(long = "env", env = "MCP_ENV", default_value = "development")]
    environment: String,
    /// Answer every service call from the service's mock.
    #[arg(long)]
    mock: bool,
    /// Time a request may take in all, service calls included.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: std::time::Duration,
    /// Time a client has to send a request head, from the connection's
    /// start or the head's first byte.
    #[arg(long, env = "HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: std::time::Duration,
    /// An idle keep-alive connection is closed after this long.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
    /// Most connections open at once; past it new ones wait to be accepted.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// `Host` values `/mcp` accepts, comma-separated; `*` for any. Default:
    /// `localhost`, `127.0.0.1` and `::1` (DNS-rebinding protection).
    #[arg(long, env = "MCP_ALLOWED_HOSTS")]
    mcp_allowed_hosts: Option<String>,
    /// Browser `Origin` values `/mcp` accepts, comma-separated, with scheme
    /// (`https://app.example.com`); default: any.
    #[arg(long, env = "MCP_ALLOWED_ORIGINS")]
    mcp_allowed_origins: Option<String>,
    /// On SIGTERM/SIGINT, time in-flight requests get to finish.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: std::time::Duration,
    /// A session is forgotten this long after its last turn.
    #[arg(long, env = "SESSION_TTL", default_value = "30m", value_parser = humantime::parse_duration)]
    session_ttl: std::time::Duration,
    /// Most sessions held in memory; the least recently used go first.
    #[arg(long, env = "SESSION_MAX", default_value_t = 100_000)]
    session_max: u64,
    /// Prefix of the session keys in Redis (with `SESSION_STORE_URL`).
    #[arg(long, env = "SESSION_KEY_PREFIX", default_value = mcp_orchestrator::session::redis_store::DEFAULT_KEY_PREFIX)]
    session_key_prefix: String,
    /// Time one Redis operation may take, connection wait included; a turn
    /// whose session operation runs out of it goes on without its session.
    #[arg(long, env = "SESSION_STORE_TIMEOUT", default_value = "250ms", value_parser = humantime::parse_duration)]
    session_store_timeout: std::time::Duration,
    /// Log level or EnvFilter directive.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// `json` or `pretty`; default: pretty on a terminal, JSON otherwise.
    #[arg(long, env = "LOG_FORMAT")]
    log_format: Option<String>,
    /// Log service request and response payloads (redacted) at any level.
    #[arg(long, env = "LOG_PAYLOADS")]
    log_payloads: bool,
    /// The console at `/console`: `on` or `off`. Default: on in
    /// development; in production on only when a caller key is declared
    /// with `console: true` (and then only such keys open it).
    #[arg(long, env = "MCP_CONSOLE", value_parser = ["on", "off"])]
    console: Option<String>,
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
        Command::Serve(args) => serve(*args),
        Command::Check(args) => check(args),
        Command::Test(args) => test(args),
        Command::Graph(args) => graph(args),
        Command::Schema(args) => {
            let schema = if args.tests {
                mcp_orchestrator::flowtest::spec::test_file_json_schema()
            } else {
                mcp_orchestrator::spec::flow_file_json_schema()
            };
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut stdout, &schema)?;
            writeln!(stdout)?;
            Ok(EXIT_OK)
        }
    }
}

/// The projects `check` and `test` work on: `dir` itself, or each tenant
/// of a deployment of several (only `tenant`, when given).
fn projects(dir: &Path, tenant: Option<&str>) -> anyhow::Result<Vec<(Option<String>, PathBuf)>> {
    use mcp_orchestrator::tenants;
    if !tenants::is_multi_tenant(dir) {
        if let Some(name) = tenant {
            anyhow::bail!(
                "--tenant {name}: `{}` is one project, without `tenants/`",
                dir.display()
            );
        }
        return Ok(vec![(None, dir.to_path_buf())]);
    }
    let tenants::TenantFolders {
        tenants: found,
        invalid,
    } = tenants::tenant_dirs(dir)?;
    for name in invalid {
        eprintln!(
            "warning: `tenants/{name}` is skipped: a tenant's name is lower-case letters, digits, `-` and `_`"
        );
    }
    let found: Vec<(Option<String>, PathBuf)> = found
        .into_iter()
        .filter(|(name, _)| tenant.is_none_or(|wanted| wanted == name))
        .map(|(name, path)| (Some(name), path))
        .collect();
    if found.is_empty() {
        match tenant {
            Some(name) => anyhow::bail!("there is no tenant `{name}` in `{}`", dir.display()),
            None => anyhow::bail!("`{}/tenants` holds no tenant", dir.display()),
        }
    }
    Ok(found)
}

/// `graph`: the compiled project drawn on standard output; a project with
/// errors gets its diagnostics instead (exit 1).
fn graph(args: GraphArgs) -> anyhow::Result<u8> {
    use mcp_orchestrator::graph::{GraphError, GraphFormat};
    if !args.dir.is_dir() {
        anyhow::bail!("`{}` is not a directory", args.dir.display());
    }
    let environment = std::env::vars().collect();
    let checked = mcp_orchestrator::check::check_project(&args.dir, &environment);
    let Some(project) = &checked.project else {
        let color = std::io::stderr().is_terminal();
        eprint!(
            "{}",
            diagnostic::render_human(&checked.diagnostics, &checked.sources, color)
        );
        return Ok(EXIT_INVALID_PROJECT);
    };
    let format = match args.format {
        GraphOutput::Mermaid => GraphFormat::Mermaid,
        GraphOutput::Dot => GraphFormat::Dot,
        GraphOutput::Svg => GraphFormat::Svg,
    };
    match mcp_orchestrator::graph::render(project, args.flow.as_deref(), format) {
        Ok(text) => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(EXIT_OK)
        }
        Err(error @ GraphError::UnknownFlow { .. }) => {
            eprintln!("error: {error}");
            Ok(EXIT_USAGE)
        }
        Err(error) => anyhow::bail!("{error}"),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<u8> {
    if !args.dir.is_dir() {
        anyhow::bail!("`{}` is not a directory", args.dir.display());
    }
    let environment = std::env::vars().collect();
    let mut checked = mcp_orchestrator::check::Checked {
        project: None,
        diagnostics: Vec::new(),
        sources: Default::default(),
    };
    for (tenant, dir) in projects(&args.dir, args.tenant.as_deref())? {
        let mut one = mcp_orchestrator::flowtest::check_with_tests(&dir, &environment);
        if args.online {
            match &one.project {
                Some(project) => {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let online =
                        runtime.block_on(mcp_orchestrator::check::online::check_mcp_servers(
                            &dir,
                            &environment,
                            project,
                        ));
                    one.diagnostics.extend(online);
                }
                None => eprintln!("--online: not checked, the project has errors"),
            }
        }
        // Paths relative to the deployment: `tenants/<name>/flows/…`.
        let prefix = match &tenant {
            Some(name) => Path::new(mcp_orchestrator::tenants::TENANTS_DIR).join(name),
            None => PathBuf::new(),
        };
        checked
            .diagnostics
            .extend(one.diagnostics.into_iter().map(|d| d.under(&prefix)));
        checked.sources.merge(one.sources.under(&prefix));
    }
    diagnostic::sort(&mut checked.diagnostics);
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

fn serve(args: ServeArgs) -> anyhow::Result<u8> {
    use mcp_orchestrator::server::{self, AppState, Environment, RuntimeSettings};
    use mcp_orchestrator::telemetry::{self, LogFormat, TelemetryConfig, loki, prometheus};

    let environment = match args.environment.to_ascii_lowercase().as_str() {
        "production" | "prod" => Environment::Production,
        "development" | "dev" | "" => Environment::Development,
        other => anyhow::bail!("MCP_ENV is `{other}`; use `production` or `development`"),
    };
    let non_empty = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let loki = match non_empty("GRAFANA_LOKI_URL") {
        Some(url) => Some(
            loki::LokiConfig::new(
                &url,
                non_empty("GRAFANA_LOKI_USERNAME"),
                non_empty("GRAFANA_LOKI_API_TOKEN"),
                non_empty("MCP_APP_LABEL").unwrap_or_else(|| "mcp_orchestrator".to_owned()),
                environment.as_str().to_owned(),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    // Read here, not through clap: the URL may hold a password, and clap
    // would print the value in `--help`.
    let session_store_url = non_empty("SESSION_STORE_URL");
    // Bounds that keep both stores sane: a TTL of 0 would forget every
    // session at once, and Redis refuses a TTL past its range (after the
    // script had written the turn).
    if !(std::time::Duration::from_millis(10)..=std::time::Duration::from_secs(10))
        .contains(&args.session_store_timeout)
    {
        anyhow::bail!("SESSION_STORE_TIMEOUT must be from 10ms to 10s");
    }
    if !(std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(365 * 24 * 3600))
        .contains(&args.session_ttl)
    {
        anyhow::bail!("SESSION_TTL must be from 1s to 365 days");
    }
    let loki_origin = loki.as_ref().map(loki::LokiConfig::origin);
    // The recorder first: the logging layers take their metric handles
    // from it.
    prometheus::install();
    let mut telemetry = telemetry::init(TelemetryConfig {
        level: args.log_level.clone(),
        format: LogFormat::choose(args.log_format.as_deref()),
        log_payloads: args.log_payloads,
        loki,
    })
    .map_err(anyhow::Error::msg)?;
    if let Some(origin) = &loki_origin {
        tracing::info!(event_type = "startup", loki = %origin, "Logs are shipped to Loki");
    }
    if !args.project_dir.is_dir() {
        anyhow::bail!("`{}` is not a directory", args.project_dir.display());
    }

    // Behind an HTTP proxy, service calls go through it like the LLM's and
    // Loki's (reqwest reads the proxy variables); otherwise they connect
    // directly, on the faster path.
    let proxy = mcp_orchestrator::services::proxy_configured(|name| std::env::var(name).ok());
    if let Some(variable) = proxy {
        tracing::info!(
            event_type = "startup",
            variable,
            "An HTTP proxy is configured: service calls, the LLM and Loki go through it"
        );
    }
    // A deployment of several tenants (`tenants/<name>/flows/…`) loads
    // them once the runtime runs; one project loads here.
    let multi_tenant = mcp_orchestrator::tenants::is_multi_tenant(&args.project_dir);
    let mut single = None;
    if !multi_tenant {
        // Start-up is a reload from nothing: the same path as every reload,
        // and the same checks as `check`.
        let source = mcp_orchestrator::reload::Source {
            dir: args.project_dir.clone(),
            variables: std::env::vars().collect(),
            environment,
            force_mock: args.mock,
            tenant: None,
        };
        let color = std::io::stderr().is_terminal();
        let deployment = match mcp_orchestrator::reload::prepare(&source, 1) {
            Ok(prepared) => {
                if !prepared.warnings.is_empty() {
                    eprint!(
                        "{}",
                        diagnostic::render_human(&prepared.warnings, &prepared.sources, color)
                    );
                }
                prometheus::record_generation(prepared.deployment.generation);
                prepared.deployment
            }
            Err(error) => {
                eprint!(
                    "{}",
                    diagnostic::render_human(&error.diagnostics, &error.sources, color)
                );
                eprintln!(
                    "error: the project in `{}` cannot be served; not starting",
                    args.project_dir.display()
                );
                return Ok(EXIT_INVALID_PROJECT);
            }
        };
        if environment == Environment::Production && deployment.project.access.keys.is_empty() {
            tracing::warn!(
                event_type = "startup",
                auth = "none",
                "No caller key is declared: anyone who can reach POST /orchestrate can run turns as any user"
            );
        }
        let console_keys = deployment.project.access.keys.iter().any(|key| key.console);
        let console = match args.console.as_deref() {
            Some("off") => false,
            Some(_) => {
                if environment == Environment::Production && !console_keys {
                    anyhow::bail!(
                        "MCP_CONSOLE=on in production needs a caller key declared with `console: true`"
                    );
                }
                true
            }
            None => environment == Environment::Development || console_keys,
        };
        for (service, mode) in deployment.project.services.iter().zip(&deployment.modes) {
            if *mode == mcp_orchestrator::services::ServiceMode::Mock {
                tracing::warn!(
                    event_type = "service_mock",
                    service_type = %service.name,
                    variable = service.url_variable.as_deref().unwrap_or(""),
                    "Service runs on its mock"
                );
            }
        }
        single = Some((source, deployment, console));
    }
    // Each tenant's console opens with its own `console: true` keys (in
    // production, only those).
    let tenants_console = match args.console.as_deref() {
        Some(setting) => setting == "on",
        None => environment == Environment::Development,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let http = mcp_orchestrator::services::http_client()?;
        let transport = match proxy {
            Some(_) => mcp_orchestrator::services::HttpTransport::through_proxy(http.clone()),
            None => mcp_orchestrator::services::HttpTransport::new()?,
        };
        let loki = telemetry.start_loki(http.clone());
        let _upkeep = prometheus::spawn_upkeep();
        let classifier: std::sync::Arc<dyn mcp_orchestrator::intent::Classifier> =
            match std::env::var("OPENAI_API_KEY").ok().filter(|key| !key.trim().is_empty()) {
                Some(api_key) => {
                    tracing::info!(event_type = "startup", "Intents are classified by the LLM, with the rules as fallback");
                    std::sync::Arc::new(mcp_orchestrator::intent::LlmClassifier::new(
                        mcp_orchestrator::intent::LlmConnection {
                            api_key,
                            base_url: std::env::var("OPENAI_BASE_URL").ok().filter(|v| !v.is_empty()),
                            model: std::env::var("OPENAI_MODEL").ok().filter(|v| !v.is_empty()),
                        },
                        http.clone(),
                    ))
                }
                None => std::sync::Arc::new(mcp_orchestrator::intent::RuleClassifier),
            };
        // After the ring provider is installed: a `rediss://` connection
        // builds its TLS configuration from the process's provider.
        let sessions = session_store(&args, session_store_url).await?;
        let settings = RuntimeSettings {
            environment,
            request_timeout: args.request_timeout,
            connections: server::ConnectionSettings {
                header_timeout: args.header_timeout,
                idle_timeout: args.idle_timeout,
                max_connections: args.max_connections,
            },
            mcp: server::mcp::McpSettings::from_values(
                args.mcp_allowed_hosts.as_deref(),
                args.mcp_allowed_origins.as_deref(),
            ),
        };
        let served = match single {
            Some((source, deployment, console)) => {
            let state = std::sync::Arc::new(AppState {
                deployment: arc_swap::ArcSwap::from_pointee(deployment),
                classifier,
                sessions,
                transport: std::sync::Arc::new(transport),
                settings,
                reload: std::sync::Mutex::new(Default::default()),
                admission: Default::default(),
                breakers: Default::default(),
                channels: Default::default(),
                events: Default::default(),
                console: console.then(Default::default),
                tenant: None,
            });
            if state.console.is_some() {
                tracing::info!(event_type = "startup", "The console is on at /console: every turn is recorded");
            }
            let reloader = mcp_orchestrator::reload::Reloader::new(source, state.clone());
            let _watch = reloader.watch()?;
            #[cfg(unix)]
            let _hangup = mcp_orchestrator::reload::reload_on_sighup(reloader.clone())?;
            let address = std::net::SocketAddr::from(([0, 0, 0, 0], args.port));
            async {
                let listener = tokio::net::TcpListener::bind(address).await?;
                tracing::info!(event_type = "startup", address = %listener.local_addr()?, flows = state.deployment.load().project.flows.len(), "Listening");
                let (signalled, shutdown) = signalled_shutdown();
                server::serve(listener, state.clone(), shutdown, args.shutdown_grace).await?;
                // Messages already acknowledged to a platform get their reply
                // within what is left of the grace period.
                let left = grace_left(&signalled, args.shutdown_grace);
                if !state.channels.drain(left).await {
                    tracing::warn!(
                        event_type = "shutdown",
                        queued = state.channels.queue_depth(),
                        "Some channel messages were acknowledged and not answered"
                    );
                }
                tracing::info!(event_type = "shutdown", "Stopped");
                anyhow::Ok(())
            }
            .await
            }
            None => {
                let tenants = mcp_orchestrator::tenants::Tenants::new(
                    args.project_dir.clone(),
                    mcp_orchestrator::tenants::Shared {
                        classifier,
                        sessions,
                        transport: std::sync::Arc::new(transport),
                        settings,
                        console: tenants_console,
                        variables: std::env::vars().collect(),
                        environment,
                        force_mock: args.mock,
                    },
                );
                let started = std::time::Instant::now();
                tenants.sync().await;
                let failures = tenants.failures();
                if tenants.names().is_empty() {
                    eprintln!(
                        "error: no tenant of `{}` can be served ({} failed); not starting",
                        args.project_dir.display(),
                        failures.len()
                    );
                    return anyhow::Ok(EXIT_INVALID_PROJECT);
                }
                tracing::info!(
                    event_type = "startup",
                    tenants = tenants.names().len(),
                    failed = failures.len(),
                    load_ms = started.elapsed().as_millis() as u64,
                    "Tenants loaded"
                );
                let _supervisor = tenants.watch()?;
                let address = std::net::SocketAddr::from(([0, 0, 0, 0], args.port));
                async {
                    let listener = tokio::net::TcpListener::bind(address).await?;
                    tracing::info!(event_type = "startup", address = %listener.local_addr()?, tenants = tenants.names().len(), "Listening");
                    let (signalled, shutdown) = signalled_shutdown();
                    mcp_orchestrator::tenants::serve(listener, tenants.clone(), shutdown, args.shutdown_grace).await?;
                    let left = grace_left(&signalled, args.shutdown_grace);
                    // Every tenant drains at once, within the one grace period.
                    let states = tenants.states();
                    let drained = futures_util::future::join_all(
                        states.iter().map(|state| state.channels.drain(left)),
                    )
                    .await;
                    for (state, drained) in states.iter().zip(drained) {
                        if !drained {
                            tracing::warn!(
                                event_type = "shutdown",
                                tenant = state.tenant.as_deref().unwrap_or(""),
                                queued = state.channels.queue_depth(),
                                "Some channel messages were acknowledged and not answered"
                            );
                        }
                    }
                    tracing::info!(event_type = "shutdown", "Stopped");
                    anyhow::Ok(())
                }
                .await
            }
        };
        // Whatever the outcome, what waits for Loki gets one push, within
        // the flush deadline.
        if let Some(loki) = loki {
            let stats = loki.shutdown().await;
            if stats.dropped > 0 {
                tracing::warn!(
                    event_type = "shutdown",
                    loki_sent = stats.sent,
                    loki_dropped = stats.dropped,
                    "Some log lines never reached Loki"
                );
            }
        }
        served.map(|()| EXIT_OK)
    })
}

/// The shutdown signal (SIGTERM, Ctrl-C) as a future, and when it came.
fn signalled_shutdown() -> (
    std::sync::Arc<std::sync::OnceLock<std::time::Instant>>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let signalled = std::sync::Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let signalled = signalled.clone();
        async move {
            shutdown_signal().await;
            let _ = signalled.set(std::time::Instant::now());
        }
    };
    (signalled, shutdown)
}

/// What is left of the grace period since the signal.
fn grace_left(
    signalled: &std::sync::OnceLock<std::time::Instant>,
    grace: std::time::Duration,
) -> std::time::Duration {
    signalled
        .get()
        .map_or(grace, |at| grace.saturating_sub(at.elapsed()))
}

/// The session store: Redis when `SESSION_STORE_URL` is set, else memory.
/// A Redis that does not answer yet does not stop the start-up: the
/// replica serves turns without their session until Redis answers, and
/// `/health` says so. Only a URL that cannot work is an error.
async fn session_store(
    args: &ServeArgs,
    url: Option<String>,
) -> anyhow::Result<std::sync::Arc<dyn mcp_orchestrator::session::SessionStore>> {
    use mcp_orchestrator::session::{MemorySessionStore, RedisSessionConfig, RedisSessionStore};
    let Some(url) = url else {
        tracing::info!(
            event_type = "startup",
            session_store = "memory",
            "Sessions are kept in memory"
        );
        return Ok(std::sync::Arc::new(MemorySessionStore::new(
            args.session_ttl,
            args.session_max,
        )));
    };
    let store = RedisSessionStore::new(RedisSessionConfig {
        url,
        key_prefix: args.session_key_prefix.clone(),
        ttl: args.session_ttl,
        operation_timeout: args.session_store_timeout,
    })
    .map_err(|error| anyhow::anyhow!("SESSION_STORE_URL: {error}"))?;
    // At most 2 s: long enough for a connection attempt to say why Redis
    // refuses (an operation would only see its timeout), short enough not
    // to hold the start-up.
    let startup_wait = mcp_orchestrator::session::redis_store::CONNECT_TIMEOUT * 2;
    match store
        .ping(startup_wait.max(args.session_store_timeout))
        .await
    {
        Ok(()) => tracing::info!(
            event_type = "startup",
            session_store = "redis",
            address = store.address(),
            key_prefix = %args.session_key_prefix,
            "Sessions are kept in Redis"
        ),
        Err(error) => tracing::warn!(
            event_type = "startup",
            session_store = "redis",
            address = store.address(),
            code = error.code(),
            error = %error,
            "Sessions are kept in Redis, which does not answer yet; turns run without their session until it does"
        ),
    }
    Ok(std::sync::Arc::new(store))
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn test(args: TestArgs) -> anyhow::Result<u8> {
    use mcp_orchestrator::flowtest::{self, report};

    if !args.dir.is_dir() {
        anyhow::bail!("`{}` is not a directory", args.dir.display());
    }
    let environment = std::env::vars().collect();
    let color = std::io::stderr().is_terminal();
    let selection = flowtest::Selection {
        filter: args.filter.as_deref(),
        golden_only: args.golden_only,
    };
    let projects = projects(&args.dir, args.tenant.as_deref())?;
    let several = projects.len() > 1 || projects.iter().any(|(tenant, _)| tenant.is_some());
    let mut results = flowtest::Report {
        cases: Vec::new(),
        golden: Vec::new(),
    };
    let mut human = String::new();
    let mut invalid = false;
    let started = std::time::Instant::now();
    for (tenant, dir) in projects {
        let prefix = match &tenant {
            Some(name) => Path::new(mcp_orchestrator::tenants::TENANTS_DIR).join(name),
            None => PathBuf::new(),
        };
        let checked = flowtest::check_with_tests(&dir, &environment);
        let Some(project) = checked.project else {
            let diagnostics: Vec<_> = checked
                .diagnostics
                .into_iter()
                .map(|d| d.under(&prefix))
                .collect();
            eprint!(
                "{}",
                diagnostic::render_human(&diagnostics, &checked.sources.under(&prefix), color)
            );
            match &tenant {
                // The other tenants are still tested.
                Some(name) => eprintln!(
                    "error: tenant `{name}`: the project or its tests are invalid; its tests were not run"
                ),
                None => eprintln!("error: the project or its tests are invalid; no test was run"),
            }
            invalid = true;
            continue;
        };
        let tests = flowtest::load_tests(&dir, &environment);
        let tenant_started = std::time::Instant::now();
        let report = flowtest::run(&project, &tests, selection).under(&prefix);
        if matches!(args.format, TestFormat::Human) {
            let coverage = args.coverage.then(|| flowtest::coverage(&project, &report));
            if let Some(name) = &tenant {
                human.push_str(&format!("== tenant {name}\n"));
            }
            human.push_str(&report::human(
                &report,
                coverage.as_ref(),
                tenant_started.elapsed(),
            ));
            if several {
                human.push('\n');
            }
        }
        results.extend(report);
    }
    let elapsed = started.elapsed();
    let output = match args.format {
        TestFormat::Human => {
            if several {
                let (passed, failed) = results.counts();
                human.push_str(&format!(
                    "all tenants: {passed} passed, {failed} failed in {:.2}s\n",
                    elapsed.as_secs_f64()
                ));
            }
            human
        }
        TestFormat::Junit => report::junit(&results),
        TestFormat::Github => report::github(&results),
    };
    match &args.output {
        Some(path) => std::fs::write(path, output)?,
        None => print!("{output}"),
    }
    if invalid {
        return Ok(EXIT_USAGE);
    }
    if results.cases.is_empty() && results.golden.is_empty() {
        eprintln!(
            "error: no test case ran (is `flows/tests/` empty, does --filter match nothing, or has no test file a golden set?)"
        );
        return Ok(EXIT_INVALID_PROJECT);
    }
    Ok(if results.passed() {
        EXIT_OK
    } else {
        EXIT_INVALID_PROJECT
    })
}
