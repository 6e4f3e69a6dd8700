//! Services: URL, timeout, retry, headers, response schema and mock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as Json;

use crate::diagnostic::{Code, Diagnostic};
use crate::project;
use crate::spec::{self, Position, Spanned};

use super::schemas::{SchemaFile, at_pointer};
use super::{Checker, Defined, stays_inside};

impl Checker<'_> {
    /// A positive duration such as `2s` or `150ms`.
    pub(super) fn duration(&mut self, file: &Path, text: &spec::Text) -> Option<Duration> {
        match humantime::parse_duration(text.value.trim()) {
            Ok(duration) if !duration.is_zero() => Some(duration),
            Ok(_) => {
                let location = self.location(file, text, text.value.len());
                self.error(
                    Code::InvalidDuration,
                    location,
                    "a duration must be greater than zero",
                );
                None
            }
            Err(error) => {
                let location = self.location(file, text, text.value.len());
                self.push(
                    Diagnostic::error(
                        Code::InvalidDuration,
                        location,
                        format!("invalid duration `{}`: {error}", text.value),
                    )
                    .with_hint("write a number with a unit, such as `2s`, `150ms` or `1m`"),
                );
                None
            }
        }
    }

    pub(super) fn compile_service(
        &mut self,
        service: &Defined<'_, spec::Service>,
    ) -> Option<project::Service> {
        let spec = service.spec;
        let file = service.file;
        let mut ok = true;
        if let Some(schema) = spec.response.as_ref().and_then(|r| r.value.schema.as_ref()) {
            self.service_schema_files
                .insert(service.name.value.clone(), schema.value.trim().to_owned());
        }
        let (url, url_variable) = match &spec.url {
            Some(text) => {
                let variable = self.variable_at(file, text.position);
                match self.http_url(
                    file,
                    text,
                    "service URLs look like `http://menu.internal:8080/menu`",
                ) {
                    Ok(url) => (url, variable),
                    Err(()) => {
                        ok = false;
                        (None, variable)
                    }
                }
            }
            None => (None, None),
        };
        let timeout = match &spec.timeout {
            Some(text) => self.duration(file, text),
            None => Some(project::DEFAULT_SERVICE_TIMEOUT),
        };
        let retry = match &spec.retry {
            Some(retry) => self.retry_policy(file, retry),
            None => Some(None),
        };
        let (unwrap_first, response_schema) = match &spec.response {
            Some(response) => {
                let unwrap_first = response
                    .value
                    .unwrap
                    .as_ref()
                    .is_some_and(|unwrap| unwrap.value == spec::Unwrap::First);
                let schema = match &response.value.schema {
                    Some(name) => self
                        .schema_file(file, name)
                        .map(|schema| Some((name.value.trim().to_owned(), schema))),
                    None => Some(None),
                };
                (unwrap_first, schema)
            }
            None => (false, Some(None)),
        };
        let mock = match &spec.mock {
            Some(mock) => self.compile_mock(
                file,
                &service.name.value,
                mock,
                unwrap_first,
                response_schema
                    .as_ref()
                    .and_then(|s| s.as_ref())
                    .map(|(_, s)| s),
            ),
            None => Some(None),
        };
        let circuit_breaker = match &spec.circuit_breaker {
            Some(policy) => self.circuit_breaker(file, policy).map(Some),
            None => Some(None),
        };
        let mut headers = Vec::new();
        for (name, value) in &spec.headers {
            if reqwest_header_name_is_valid(&name.value) {
                headers.push((name.value.clone(), value.value.clone()));
            } else {
                let location = self.location(file, name, name.value.len());
                self.error(
                    Code::InvalidValue,
                    location,
                    format!("`{}` is not a valid HTTP header name", name.value),
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        let mcp_tool = self.service_kind(file, spec)?;
        let response_schema = match response_schema? {
            Some((file, schema)) => Some(project::ResponseSchema {
                validator: self.answers_validator(&file, &schema)?,
                file,
            }),
            None => None,
        };
        Some(project::Service {
            mcp_tool,
            tenant: None,
            name: service.name.value.clone(),
            url,
            url_variable,
            method: spec
                .method
                .as_ref()
                .map_or(spec::HttpMethod::Post, |m| m.value),
            headers,
            timeout: timeout?,
            retry: retry?,
            unwrap_first,
            response_schema,
            mock: mock?,
            circuit_breaker: circuit_breaker?,
            call_metrics: std::sync::OnceLock::new(),
        })
    }

    /// The tool of a `kind: mcp` service (`Some(None)` for an HTTP one);
    /// `None` after an error.
    fn service_kind(&mut self, file: &Path, spec: &spec::Service) -> Option<Option<String>> {
        let kind = spec.kind.as_ref().map(|kind| (kind, kind.value.trim()));
        match (kind, &spec.tool) {
            (None | Some((_, "http")), None) => Some(None),
            (None | Some((_, "http")), Some(tool)) => {
                let location = self.location(file, tool, tool.value.chars().count());
                self.push(
                    Diagnostic::error(
                        Code::MisplacedKey,
                        location,
                        "`tool` belongs to a `kind: mcp` service",
                    )
                    .with_hint("add `kind: mcp` if the URL is an MCP server"),
                );
                None
            }
            (Some((_, "mcp")), None) => {
                let (kind, _) = kind?;
                let location = self.location(file, kind, 3);
                self.push(
                    Diagnostic::error(
                        Code::MissingKey,
                        location,
                        "a `kind: mcp` service needs `tool`: the MCP tool a call runs",
                    )
                    .with_hint("add `tool: <name>`; `check --online` lists the server's tools"),
                );
                None
            }
            (Some((_, "mcp")), Some(tool)) => {
                if let Some(method) = &spec.method {
                    let location = self.location(file, method, 4);
                    self.error(
                        Code::MisplacedKey,
                        location,
                        "an MCP service has no HTTP `method`: a call is a `tools/call`",
                    );
                    return None;
                }
                let name = tool.value.trim();
                if !super::tools::is_tool_name(name) {
                    let location = self.location(file, tool, tool.value.chars().count());
                    self.error(
                        Code::InvalidValue,
                        location,
                        format!("`{name}` is not an MCP tool name"),
                    );
                    return None;
                }
                Some(Some(name.to_owned()))
            }
            (Some((kind, other)), _) => {
                let location = self.location(file, kind, other.chars().count().max(1));
                self.push(
                    Diagnostic::error(
                        Code::InvalidValue,
                        location,
                        format!("unknown service kind `{other}`"),
                    )
                    .with_hint("the kinds are `http` (the default) and `mcp`"),
                );
                None
            }
        }
    }

    /// An http(s) URL with a host; `Ok(None)` when the text is empty.
    pub(super) fn http_url(
        &mut self,
        file: &Path,
        text: &spec::Text,
        example: &str,
    ) -> Result<Option<url::Url>, ()> {
        let trimmed = text.value.trim();
        if trimmed.is_empty() {
            return Ok(None);
        }
        let message = match url::Url::parse(trimmed) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                return Ok(Some(url));
            }
            Ok(url) => format!(
                "`{}` is not an http(s) URL (scheme `{}`)",
                trimmed,
                url.scheme()
            ),
            Err(error) => format!("invalid URL `{trimmed}`: {error}"),
        };
        let location = self.location(file, text, text.value.len());
        self.push(Diagnostic::error(Code::InvalidUrl, location, message).with_hint(example));
        Err(())
    }

    /// `retry:` as a policy; `Some(None)` for a single attempt.
    pub(super) fn retry_policy(
        &mut self,
        file: &Path,
        retry: &Spanned<spec::Retry>,
    ) -> Option<Option<project::RetryPolicy>> {
        let attempts = retry.value.attempts.value;
        let mut ok = true;
        if !(1..=project::MAX_RETRY_ATTEMPTS).contains(&attempts) {
            let location = self.location(file, &retry.value.attempts, 1);
            self.error(
                Code::InvalidValue,
                location,
                format!(
                    "`attempts` is {attempts}; it must be between 1 and {}",
                    project::MAX_RETRY_ATTEMPTS
                ),
            );
            ok = false;
        }
        let backoff = match &retry.value.backoff {
            Some(text) => self.duration(file, text),
            None => Some(project::DEFAULT_RETRY_BACKOFF),
        };
        // One attempt is no retry at all.
        let policy = backoff
            .map(|backoff| (attempts > 1).then_some(project::RetryPolicy { attempts, backoff }))?;
        ok.then_some(policy)
    }

    /// The `${VAR}` written at a position, so messages can name the variable.
    pub(super) fn variable_at(&self, file: &Path, position: Position) -> Option<String> {
        let text = self.sources.get(file)?;
        let line = text.lines().nth(position.line.checked_sub(1)? as usize)?;
        let start = line
            .char_indices()
            .nth(position.column.saturating_sub(1) as usize)
            .map_or(line.len(), |(index, _)| index);
        let rest = &line[start..];
        let open = rest.find("${")?;
        let name: String = rest[open + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!name.is_empty()).then_some(name)
    }

    fn compile_mock(
        &mut self,
        file: &Path,
        service: &str,
        mock: &Spanned<spec::Mock>,
        unwrap_first: bool,
        schema: Option<&Arc<SchemaFile>>,
    ) -> Option<Option<project::Mock>> {
        let spec = &mock.value;
        let status = spec.status.as_ref().map_or(200, |status| status.value);
        if !(100..=599).contains(&status) {
            let location = self.location(file, mock, 1);
            self.error(
                Code::InvalidValue,
                location,
                format!("mock status {status} is not an HTTP status"),
            );
            return None;
        }
        let (body, body_location) = match (&spec.file, &spec.response) {
            (Some(path), None) => {
                let location = self.location(file, path, path.value.len());
                let relative = PathBuf::from(path.value.trim());
                if !stays_inside(&relative) {
                    self.push(
                        Diagnostic::error(
                            Code::InvalidValue,
                            location,
                            format!("mock path `{}` leaves the project directory", relative.display()),
                        )
                        .with_hint("mock files are relative to the project directory, e.g. `mocks/menu.json`"),
                    );
                    return None;
                }
                let absolute = self.dir.join(&relative);
                let bytes = match std::fs::read(&absolute) {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        self.push(
                            Diagnostic::error(
                                Code::MockMissing,
                                location,
                                format!("cannot read mock file `{}`: {error}", relative.display()),
                            )
                            .with_hint("mock files are relative to the project directory, e.g. `mocks/menu.json`"),
                        );
                        return None;
                    }
                };
                let body = match serde_json::from_slice::<Json>(&bytes) {
                    Ok(body) => body,
                    Err(error) => {
                        self.error(
                            Code::MockInvalid,
                            location,
                            format!("mock file `{}` is not JSON: {error}", relative.display()),
                        );
                        return None;
                    }
                };
                self.hashed_files.insert(relative, bytes);
                (body, location)
            }
            (None, Some(response)) => (response.value.to_json(), self.location(file, response, 1)),
            _ => {
                let location = self.location(file, mock, 1);
                self.push(Diagnostic::error(
                    Code::InvalidValue,
                    location,
                    format!(
                        "the mock of service `{service}` needs exactly one of `file` or `response`"
                    ),
                ));
                return None;
            }
        };
        if let (Some(schema), true) = (schema, (200..300).contains(&status)) {
            let unwrapped = match (&body, unwrap_first) {
                (Json::Array(items), true) => items.first().cloned().unwrap_or(Json::Null),
                _ => body.clone(),
            };
            if let Some(error) = schema.validator.iter_errors(&unwrapped).next() {
                self.push(
                    Diagnostic::error(
                        Code::MockInvalid,
                        body_location,
                        format!(
                            "the mock of service `{service}` does not match its response schema: {error}{}",
                            at_pointer(&error.instance_path().to_string())
                        ),
                    )
                    .with_hint("a mock must be an answer the real service could give"),
                );
                return None;
            }
        }
        Some(Some(project::Mock { status, body }))
    }
}

fn reqwest_header_name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}
