//! Names: definitions gathered from every file, each name defined once,
//! and references resolved to what they name.

use std::collections::HashMap;
use std::path::Path;

use crate::diagnostic::{Code, Diagnostic, Location, did_you_mean};
use crate::load;
use crate::spec::{self, Name, Spanned};

use super::{Checker, Defined};

impl Checker<'_> {
    /// Gathers one kind of named definition from every file; a name defined
    /// twice is reported with both places.
    pub(super) fn collect<'s, T>(
        &mut self,
        files: &'s [load::LoadedFile],
        kind: &str,
        section: impl Fn(&'s spec::FlowFile) -> &'s indexmap::IndexMap<Name, T>,
    ) -> Vec<Defined<'s, T>> {
        let mut seen: HashMap<&str, (&Path, &Name)> = HashMap::new();
        let mut out = Vec::new();
        for file in files {
            for (name, spec) in section(&file.spec) {
                if let Some((first_file, first_name)) = seen.get(name.value.as_str()) {
                    let related =
                        Location::new(*first_file, first_name.position, first_name.value.len());
                    let location = Location::new(&file.path, name.position, name.value.len());
                    self.push(
                        Diagnostic::error(
                            Code::DuplicateName,
                            location,
                            format!("{kind} `{}` is defined twice", name.value),
                        )
                        .with_related(related, "first defined here")
                        .with_hint(format!(
                            "{kind} names are unique across the project; rename or remove one"
                        )),
                    );
                    continue;
                }
                seen.insert(name.value.as_str(), (&file.path, name));
                out.push(Defined {
                    file: &file.path,
                    name,
                    spec,
                });
            }
        }
        out
    }

    /// A top-level section that must appear at most once in the project.
    pub(super) fn single<'s, T>(
        &mut self,
        files: &'s [load::LoadedFile],
        key: &str,
        section: impl Fn(&'s spec::FlowFile) -> Option<&'s Spanned<T>>,
    ) -> Option<(&'s Path, &'s Spanned<T>)> {
        let mut first: Option<(&Path, &Spanned<T>)> = None;
        for file in files {
            if let Some(value) = section(&file.spec) {
                if let Some((first_file, first_value)) = first {
                    let related = Location::new(first_file, first_value.position, 1);
                    self.push(
                        Diagnostic::error(
                            Code::DuplicateName,
                            Location::new(&file.path, value.position, 1),
                            format!("`{key}` is defined twice"),
                        )
                        .with_related(related, "first defined here")
                        .with_hint(format!("keep one `{key}` section for the whole project")),
                    );
                } else {
                    first = Some((&file.path, value));
                }
            }
        }
        first
    }

    /// The id of the definition `name` refers to, among the `kind`s
    /// (`intent`, `service`) in `ids`. An unknown name is reported with
    /// `code`, unless an entry of that name failed to parse.
    pub(super) fn resolve<Id: Copy>(
        &mut self,
        file: &Path,
        name: &Name,
        ids: &HashMap<&str, Id>,
        kind: &str,
        code: Code,
    ) -> Option<Id> {
        if let Some(id) = ids.get(name.value.as_str()) {
            return Some(*id);
        }
        if !self.unparsed_names.contains(&name.value) {
            let location = self.location(file, name, name.value.len());
            let hint = did_you_mean(&name.value, ids.keys().copied())
                .unwrap_or_else(|| known_names(&format!("{kind}s"), ids.keys().copied()));
            self.push(
                Diagnostic::error(code, location, format!("unknown {kind} `{}`", name.value))
                    .with_hint(hint),
            );
        }
        None
    }
}

fn known_names<'n>(what: &str, names: impl Iterator<Item = &'n str>) -> String {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    if names.is_empty() {
        format!("the project defines no {what}")
    } else {
        format!(
            "known {what}: {}",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
