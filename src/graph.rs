//! The flows as a graph: intent → flow → steps, drawn as Mermaid, DOT or
//! SVG from the compiled project (`mcp-orchestrator graph`, the console).
//!
//! One model is built from the compiled project ([`FlowGraph`]), then
//! written out by one of three writers. Nodes are the intents, the flows
//! and every step; edges follow the order the engine runs steps in: a
//! step leads to the next one unless it replies, an `if` step has an
//! `else` edge (into its `else` steps, or on to the next step), blocks
//! (`then`, `switch` cases, `parallel` branches) flow on to the step after
//! them, and `on_error` steps hang off their call (or their flow) on a
//! dashed edge.
//!
//! Every node has an id made of `[A-Za-z0-9_-]` only (`intent-menu`,
//! `flow-menu`, `step-3`, where 3 is `Step::index`): the SVG puts it on the
//! node's `<g>` element and the DOT on the node's `id` attribute, so a page
//! can highlight the steps a trace visited. Mermaid and DOT name nodes
//! `i_menu`, `f_menu`, `s3`.
//!
//! The text of an `if` condition is not kept in the compiled project (only
//! the compiled expression), so a conditional step is marked `if ·`; its
//! place in the flow files is in the DOT tooltip and the SVG's
//! `data-source` attribute.

use std::collections::HashSet;
use std::fmt;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};

use layout::adt::dag::NodeHandle;
use layout::backends::svg::SVGWriter;
use layout::core::base::Orientation;
use layout::core::color::Color;
use layout::core::geometry::Point;
use layout::core::style::{LineStyleKind, StyleAttr};
use layout::std_shapes::shapes::{Arrow, Element, LineEndKind, ShapeKind};
use layout::topo::layout::VisualGraph;

use crate::project::{Action, CompiledProject, Decision, Step};

/// How a graph is written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    /// A Mermaid `flowchart TD`, as GitHub renders in Markdown.
    Mermaid,
    /// A Graphviz `digraph`.
    Dot,
    /// A standalone SVG document, laid out here (no Graphviz needed).
    Svg,
}

/// Why a graph could not be drawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphError {
    /// No flow of that name.
    UnknownFlow {
        /// The name asked for.
        name: String,
        /// The closest flow name, when one is close enough.
        suggestion: Option<String>,
    },
    /// The layout failed (a drawing fault, not the project's).
    Layout(String),
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GraphError::UnknownFlow { name, suggestion } => {
                write!(f, "there is no flow named `{name}`")?;
                if let Some(suggestion) = suggestion {
                    write!(f, "; did you mean `{suggestion}`?")?;
                }
                Ok(())
            }
            GraphError::Layout(message) => write!(f, "the graph could not be laid out: {message}"),
        }
    }
}

impl std::error::Error for GraphError {}

/// The project's flows (or only `flow`, with the intents that run it) as a
/// graph in `format`.
pub fn render(
    project: &CompiledProject,
    flow: Option<&str>,
    format: GraphFormat,
) -> Result<String, GraphError> {
    let selected = match flow {
        Some(name) => Some(flow_index(project, name)?),
        None => None,
    };
    let graph = FlowGraph::build(project, selected);
    match format {
        GraphFormat::Mermaid => Ok(write_mermaid(&graph)),
        GraphFormat::Dot => Ok(write_dot(&graph)),
        GraphFormat::Svg => write_svg(&graph),
    }
}

/// The position of the flow called `name`, or `UnknownFlow` with the
/// closest name.
fn flow_index(project: &CompiledProject, name: &str) -> Result<usize, GraphError> {
    if let Some(index) = project.flows.iter().position(|flow| flow.name == name) {
        return Ok(index);
    }
    let mut best: Option<(f64, &str)> = None;
    for flow in &project.flows {
        let score = strsim::jaro_winkler(name, &flow.name);
        if score > 0.8 && best.is_none_or(|(best_score, _)| score > best_score) {
            best = Some((score, flow.name.as_str()));
        }
    }
    Err(GraphError::UnknownFlow {
        name: name.to_owned(),
        suggestion: best.map(|(_, candidate)| candidate.to_owned()),
    })
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

/// What a node stands for; decides its shape and colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    Intent,
    Flow,
    Call,
    Reply,
    Set,
    Then,
    Switch,
    Parallel,
    Foreach,
}

impl NodeKind {
    const ALL: [NodeKind; 9] = [
        NodeKind::Intent,
        NodeKind::Flow,
        NodeKind::Call,
        NodeKind::Reply,
        NodeKind::Set,
        NodeKind::Then,
        NodeKind::Switch,
        NodeKind::Parallel,
        NodeKind::Foreach,
    ];

    /// The CSS class (SVG, DOT) and Mermaid class of the kind.
    fn class(self) -> &'static str {
        match self {
            NodeKind::Intent => "intent",
            NodeKind::Flow => "flow",
            NodeKind::Call => "call",
            NodeKind::Reply => "reply",
            NodeKind::Set => "set",
            NodeKind::Then => "then",
            NodeKind::Switch => "switch",
            NodeKind::Parallel => "parallel",
            NodeKind::Foreach => "foreach",
        }
    }

    /// Light fill, then stroke.
    fn colours(self) -> (&'static str, &'static str) {
        match self {
            NodeKind::Intent => ("#e3f2fd", "#1565c0"),
            NodeKind::Flow => ("#ede7f6", "#4527a0"),
            NodeKind::Call => ("#fff8e1", "#ef6c00"),
            NodeKind::Reply => ("#e8f5e9", "#2e7d32"),
            NodeKind::Set => ("#f5f5f5", "#616161"),
            NodeKind::Then => ("#fafafa", "#9e9e9e"),
            NodeKind::Switch => ("#fce4ec", "#ad1457"),
            NodeKind::Parallel => ("#e0f7fa", "#00838f"),
            NodeKind::Foreach => ("#f3e5f5", "#6a1b9a"),
        }
    }
}

/// One node: an intent, a flow or a step.
#[derive(Debug)]
struct Node {
    /// `intent-<name>`, `flow-<name>`, `step-<index>`; `[A-Za-z0-9_-]`
    /// only and unique, so it is safe in an attribute and a CSS selector.
    element_id: String,
    /// `i_<name>`, `f_<name>`, `s<index>`; `[A-Za-z0-9_]` only, starting
    /// with a letter and unique: a Mermaid and DOT identifier as is.
    name: String,
    kind: NodeKind,
    /// The text shown, one entry a line, already shortened.
    lines: Vec<String>,
    /// Where a step was written (`file:line:column`).
    source: Option<String>,
}

/// One edge. At most one per pair of nodes: a second path between the
/// same two nodes merges its label into the first.
#[derive(Debug)]
struct Edge {
    from: usize,
    to: usize,
    /// Empty for the plain "then the next step".
    label: String,
    /// `on_error` edges.
    dashed: bool,
}

/// The graph every writer draws.
#[derive(Debug, Default)]
struct FlowGraph {
    nodes: Vec<Node>,
    edges: Vec<Edge>,
}

/// An edge waiting for the node it leads to: the open end of a path that
/// goes on with whatever step comes next.
#[derive(Debug, Clone)]
struct OpenEnd {
    from: usize,
    label: String,
    dashed: bool,
}

impl OpenEnd {
    fn new(from: usize, label: &str) -> OpenEnd {
        OpenEnd {
            from,
            label: label.to_owned(),
            dashed: false,
        }
    }
}

/// Names longer than this are cut, with an ellipsis.
const MAX_NAME_CHARS: usize = 32;
/// A whole line (a `set` with many names) longer than this is cut.
const MAX_LINE_CHARS: usize = 44;

/// Builds a [`FlowGraph`], keeping the ids it handed out unique.
struct GraphBuilder<'p> {
    project: &'p CompiledProject,
    graph: FlowGraph,
    used_names: HashSet<String>,
    used_element_ids: HashSet<String>,
}

impl FlowGraph {
    /// The graph of every flow, or of the flow at `selected` only.
    fn build(project: &CompiledProject, selected: Option<usize>) -> FlowGraph {
        let mut builder = GraphBuilder {
            project,
            graph: FlowGraph::default(),
            used_names: HashSet::new(),
            used_element_ids: HashSet::new(),
        };
        for (flow_index, flow) in project.flows.iter().enumerate() {
            if selected.is_some_and(|selected| selected != flow_index) {
                continue;
            }
            let intents: Vec<usize> = project
                .flow_for_intent
                .iter()
                .enumerate()
                .filter(|(_, flow_id)| flow_id.0 as usize == flow_index)
                .map(|(intent_index, _)| intent_index)
                .collect();
            let intent_nodes: Vec<usize> = intents
                .iter()
                .filter_map(|intent_index| project.intents.get(*intent_index))
                .map(|intent| builder.add_named_node(NodeKind::Intent, &intent.name))
                .collect();
            let flow_node = builder.add_named_node(NodeKind::Flow, &flow.name);
            if let Some(tool) = &flow.tool {
                builder.add_line(flow_node, format!("tool {}", shorten(&tool.name)));
            }
            for intent_node in intent_nodes {
                builder.add_edge(intent_node, flow_node, "", false);
            }
            // A valid flow replies on every path: nothing is left open.
            builder.sequence(&flow.steps, vec![OpenEnd::new(flow_node, "")]);
            if let Some(on_error) = &flow.on_error {
                let entry = OpenEnd {
                    from: flow_node,
                    label: "on_error".to_owned(),
                    dashed: true,
                };
                builder.sequence(on_error, vec![entry]);
            }
        }
        builder.graph
    }
}

impl GraphBuilder<'_> {
    /// Adds `steps` in order, the first one reached from `open`; returns
    /// what is left open after the last one.
    fn sequence(&mut self, steps: &[Step], mut open: Vec<OpenEnd>) -> Vec<OpenEnd> {
        for step in steps {
            open = self.step(step, open);
        }
        open
    }

    /// A block of steps entered from `from` by an edge labelled `label`;
    /// an empty block leaves that edge open.
    fn block(&mut self, from: usize, label: &str, steps: &[Step]) -> Vec<OpenEnd> {
        self.sequence(steps, vec![OpenEnd::new(from, label)])
    }

    /// Adds `step` (and the steps inside it), reached from `incoming`;
    /// returns the paths that go on to the next step.
    fn step(&mut self, step: &Step, incoming: Vec<OpenEnd>) -> Vec<OpenEnd> {
        let node = self.add_step_node(step);
        for end in incoming {
            self.add_edge(end.from, node, &end.label, end.dashed);
        }
        let conditional = step.condition.is_some();
        let mut open = match &step.action {
            Action::Reply(_) => Vec::new(),
            Action::Set(_) => vec![OpenEnd::new(node, "")],
            Action::Call(call) => {
                let mut open = vec![OpenEnd::new(node, "")];
                if let Some(on_error) = &call.on_error {
                    let entry = OpenEnd {
                        from: node,
                        label: "on_error".to_owned(),
                        dashed: true,
                    };
                    // `on_error` ends with a reply; should it not, it goes on.
                    open.extend(self.sequence(on_error, vec![entry]));
                }
                open
            }
            Action::Then(steps) => self.block(node, if conditional { "then" } else { "" }, steps),
            Action::Switch(switch) => {
                let mut open = Vec::new();
                for (value, steps) in &switch.cases {
                    open.extend(self.block(node, &shorten(value), steps));
                }
                open.extend(self.block(node, "default", &switch.default));
                open
            }
            Action::Parallel(branches) => {
                let mut open = Vec::new();
                for branch in branches {
                    open.extend(self.step(branch, vec![OpenEnd::new(node, "")]));
                }
                if branches.is_empty() {
                    open.push(OpenEnd::new(node, ""));
                }
                open
            }
            Action::Foreach(foreach) => {
                // The body's last steps loop back for the next element.
                for end in self.block(node, "each", &foreach.steps) {
                    if end.from != node {
                        self.add_edge(end.from, node, "next", end.dashed);
                    }
                }
                vec![OpenEnd::new(node, "done")]
            }
        };
        if conditional {
            if step.otherwise.is_empty() {
                // A plain edge to the next step already covers `else`.
                let goes_on = open
                    .iter()
                    .any(|end| end.from == node && end.label.is_empty());
                if !goes_on {
                    open.push(OpenEnd::new(node, "else"));
                }
            } else {
                open.extend(self.block(node, "else", &step.otherwise));
            }
        }
        open
    }

    fn add_step_node(&mut self, step: &Step) -> usize {
        let (kind, mut lines) = match &step.action {
            Action::Call(call) => {
                let service = self
                    .project
                    .services
                    .get(call.service.0 as usize)
                    .map_or("?", |service| service.name.as_str());
                (NodeKind::Call, vec![format!("call {}", shorten(service))])
            }
            Action::Reply(reply) => {
                let mut line = format!("reply {}", shorten(&reply.route));
                if reply.decision != Decision::Reply {
                    let _ = write!(line, " ({})", reply.decision.as_str());
                }
                (NodeKind::Reply, vec![line])
            }
            Action::Set(values) => {
                let names: Vec<&str> = values.iter().map(|(name, _)| name.as_str()).collect();
                let line = shorten_to(&format!("set {}", names.join(", ")), MAX_LINE_CHARS);
                (NodeKind::Set, vec![line])
            }
            Action::Then(_) => (NodeKind::Then, vec!["then".to_owned()]),
            Action::Switch(_) => (NodeKind::Switch, vec!["switch".to_owned()]),
            Action::Parallel(_) => (NodeKind::Parallel, vec!["parallel".to_owned()]),
            Action::Foreach(foreach) => (
                NodeKind::Foreach,
                vec![format!("foreach {}", shorten(&foreach.binding))],
            ),
        };
        if step.condition.is_some() {
            // The condition's text is not kept: say where to read it.
            let file = step
                .source
                .file
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            lines.insert(0, format!("if … ({}:{})", shorten(&file), step.source.line));
        }
        if let Some(id) = &step.id {
            lines.push(format!("id: {}", shorten(id)));
        }
        let source = &step.source;
        self.graph.nodes.push(Node {
            element_id: unique(
                &mut self.used_element_ids,
                format!("step-{}", step.index),
                '-',
            ),
            name: unique(&mut self.used_names, format!("s{}", step.index), '_'),
            kind,
            lines,
            source: Some(format!(
                "{}:{}:{}",
                source.file.display(),
                source.line,
                source.column
            )),
        });
        self.graph.nodes.len() - 1
    }

    /// An intent or flow node: `<kind> <name>`.
    fn add_named_node(&mut self, kind: NodeKind, name: &str) -> usize {
        let (element_prefix, name_prefix) = match kind {
            NodeKind::Intent => ("intent-", "i_"),
            _ => ("flow-", "f_"),
        };
        let element_id = format!("{element_prefix}{}", escape_name(name, true));
        let node_name = format!("{name_prefix}{}", escape_name(name, false));
        self.graph.nodes.push(Node {
            element_id: unique(&mut self.used_element_ids, element_id, '-'),
            name: unique(&mut self.used_names, node_name, '_'),
            kind,
            lines: vec![format!("{} {}", kind.class(), shorten(name))],
            source: None,
        });
        self.graph.nodes.len() - 1
    }

    fn add_line(&mut self, node: usize, line: String) {
        if let Some(node) = self.graph.nodes.get_mut(node) {
            node.lines.push(line);
        }
    }

    /// Adds an edge, or merges it into the edge already joining the two
    /// nodes: labels are joined, and a plain path wins over a labelled one.
    fn add_edge(&mut self, from: usize, to: usize, label: &str, dashed: bool) {
        let existing = self
            .graph
            .edges
            .iter_mut()
            .find(|edge| edge.from == from && edge.to == to);
        match existing {
            Some(edge) => {
                edge.dashed &= dashed;
                if edge.label.is_empty() || label.is_empty() {
                    edge.label.clear();
                } else if !edge.label.split(", ").any(|known| known == label) {
                    edge.label.push_str(", ");
                    edge.label.push_str(label);
                }
            }
            None => self.graph.edges.push(Edge {
                from,
                to,
                label: label.to_owned(),
                dashed,
            }),
        }
    }
}

/// `base`, or `base` with a counter when it is taken already.
fn unique(used: &mut HashSet<String>, base: String, separator: char) -> String {
    if used.insert(base.clone()) {
        return base;
    }
    let mut counter = 2_u64;
    loop {
        let candidate = format!("{base}{separator}{counter}");
        if used.insert(candidate.clone()) {
            return candidate;
        }
        counter += 1;
    }
}

/// `name` with only `[A-Za-z0-9_]` (and `-` when `allow_hyphen`); any other
/// character becomes `_<hex code point>_`.
fn escape_name(name: &str, allow_hyphen: bool) -> String {
    let mut escaped = String::with_capacity(name.len());
    for character in name.chars() {
        if character.is_ascii_alphanumeric()
            || character == '_'
            || (allow_hyphen && character == '-')
        {
            escaped.push(character);
        } else {
            let _ = write!(escaped, "_{:x}_", u32::from(character));
        }
    }
    escaped
}

/// A name for a label: control characters as spaces, at most
/// [`MAX_NAME_CHARS`] characters.
fn shorten(text: &str) -> String {
    shorten_to(text, MAX_NAME_CHARS)
}

fn shorten_to(text: &str, max_chars: usize) -> String {
    let clean: String = text
        .chars()
        .map(|character| {
            if character.is_control() {
                ' '
            } else {
                character
            }
        })
        .collect();
    if clean.chars().count() <= max_chars {
        return clean;
    }
    let mut cut: String = clean.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

// ---------------------------------------------------------------------------
// Mermaid
// ---------------------------------------------------------------------------

fn write_mermaid(graph: &FlowGraph) -> String {
    let mut out = String::from("flowchart TD\n");
    for node in &graph.nodes {
        let text = node
            .lines
            .iter()
            .map(|line| mermaid_text(line))
            .collect::<Vec<_>>()
            .join("<br/>");
        let (open, close) = match node.kind {
            NodeKind::Intent => ("([", "])"),
            NodeKind::Flow => ("[[", "]]"),
            NodeKind::Reply => ("(", ")"),
            NodeKind::Switch => ("{{", "}}"),
            _ => ("[", "]"),
        };
        let _ = writeln!(out, "    {}{open}\"{text}\"{close}", node.name);
    }
    let mut error_edges = Vec::new();
    for (position, edge) in graph.edges.iter().enumerate() {
        let (Some(from), Some(to)) = (graph.nodes.get(edge.from), graph.nodes.get(edge.to)) else {
            continue;
        };
        let arrow = if edge.dashed { "-.->" } else { "-->" };
        if edge.dashed {
            error_edges.push(position.to_string());
        }
        if edge.label.is_empty() {
            let _ = writeln!(out, "    {} {arrow} {}", from.name, to.name);
        } else {
            let label = mermaid_text(&edge.label);
            let _ = writeln!(out, "    {} {arrow}|\"{label}\"| {}", from.name, to.name);
        }
    }
    for kind in NodeKind::ALL {
        let members: Vec<&str> = graph
            .nodes
            .iter()
            .filter(|node| node.kind == kind)
            .map(|node| node.name.as_str())
            .collect();
        if members.is_empty() {
            continue;
        }
        let (fill, stroke) = kind.colours();
        let width = if kind == NodeKind::Flow { "2px" } else { "1px" };
        let _ = writeln!(
            out,
            "    classDef {} fill:{fill},stroke:{stroke},stroke-width:{width},color:#212121",
            kind.class()
        );
        let _ = writeln!(out, "    class {} {}", members.join(","), kind.class());
    }
    if !error_edges.is_empty() {
        let _ = writeln!(
            out,
            "    linkStyle {} stroke:#c62828,color:#c62828",
            error_edges.join(",")
        );
    }
    out
}

/// Text for inside a quoted Mermaid label: `"` and the characters Mermaid
/// reads as markup become entity codes (`#quot;`).
fn mermaid_text(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '"' => escaped.push_str("#quot;"),
            '#' => escaped.push_str("#35;"),
            '&' => escaped.push_str("#amp;"),
            '<' => escaped.push_str("#lt;"),
            '>' => escaped.push_str("#gt;"),
            '`' => escaped.push_str("#96;"),
            '|' => escaped.push_str("#124;"),
            character if character.is_control() => escaped.push(' '),
            character => escaped.push(character),
        }
    }
    escaped
}

// ---------------------------------------------------------------------------
// DOT
// ---------------------------------------------------------------------------

fn write_dot(graph: &FlowGraph) -> String {
    let mut out = String::from("digraph flows {\n    rankdir=TB;\n");
    out.push_str("    node [fontname=\"Helvetica\", fontsize=\"12\"];\n");
    out.push_str("    edge [fontname=\"Helvetica\", fontsize=\"10\"];\n");
    for node in &graph.nodes {
        let label = node
            .lines
            .iter()
            .map(|line| dot_text(line))
            .collect::<Vec<_>>()
            .join("\\n");
        let (shape, style) = match node.kind {
            NodeKind::Intent => ("ellipse", "filled"),
            NodeKind::Flow => ("box", "bold,filled"),
            NodeKind::Reply => ("box", "rounded,filled"),
            NodeKind::Switch => ("hexagon", "filled"),
            _ => ("box", "filled"),
        };
        let (fill, stroke) = node.kind.colours();
        let _ = write!(
            out,
            "    {} [id=\"{}\", class=\"node {}\", label=\"{label}\", shape=\"{shape}\", style=\"{style}\", color=\"{stroke}\", fillcolor=\"{fill}\"",
            node.name,
            node.element_id,
            node.kind.class(),
        );
        if let Some(source) = &node.source {
            let _ = write!(out, ", tooltip=\"{}\"", dot_text(source));
        }
        out.push_str("];\n");
    }
    for edge in &graph.edges {
        let (Some(from), Some(to)) = (graph.nodes.get(edge.from), graph.nodes.get(edge.to)) else {
            continue;
        };
        let mut attributes = Vec::new();
        if !edge.label.is_empty() {
            attributes.push(format!("label=\"{}\"", dot_text(&edge.label)));
        }
        if edge.dashed {
            attributes.push("style=\"dashed\"".to_owned());
            attributes.push("color=\"#c62828\"".to_owned());
            attributes.push("fontcolor=\"#c62828\"".to_owned());
        }
        if attributes.is_empty() {
            let _ = writeln!(out, "    {} -> {};", from.name, to.name);
        } else {
            let _ = writeln!(
                out,
                "    {} -> {} [{}];",
                from.name,
                to.name,
                attributes.join(", ")
            );
        }
    }
    out.push_str("}\n");
    out
}

/// Text for inside a quoted DOT string: `"` and `\` escaped, a newline as
/// `\n`, other control characters as spaces.
fn dot_text(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            character if character.is_control() => escaped.push(' '),
            character => escaped.push(character),
        }
    }
    escaped
}

// ---------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------

/// The font size of node text in the SVG.
const SVG_FONT_SIZE: usize = 14;
/// The font size of edge labels in the SVG.
const SVG_EDGE_FONT_SIZE: usize = 12;
/// Average width of a character, in ems, for sizing nodes (a little more
/// than a sans-serif font's average, so text fits).
const SVG_CHARACTER_WIDTH: f64 = 0.62;
/// Space between the text and the node's border, in pixels.
const SVG_NODE_PADDING: f64 = 12.0;

/// What an empty graph draws: a valid document saying so.
const EMPTY_SVG: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"no\"?>\n<svg width=\"160\" height=\"40\" viewBox=\"0 0 160 40\" xmlns=\"http://www.w3.org/2000/svg\"><text x=\"80\" y=\"24\" text-anchor=\"middle\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"14\">no flows</text></svg>\n";

fn write_svg(graph: &FlowGraph) -> Result<String, GraphError> {
    if graph.nodes.is_empty() {
        return Ok(EMPTY_SVG.to_owned());
    }
    // layout-rs asserts its invariants: a panic there is a drawing fault,
    // reported as an error instead of taking the process down.
    let drawn = catch_unwind(AssertUnwindSafe(|| {
        let mut visual = VisualGraph::new(Orientation::TopToBottom);
        let handles: Vec<NodeHandle> = graph
            .nodes
            .iter()
            .map(|node| visual.add_node(svg_element(node)))
            .collect();
        for edge in &graph.edges {
            if let (Some(from), Some(to)) = (handles.get(edge.from), handles.get(edge.to)) {
                visual.add_edge(svg_arrow(edge), *from, *to);
            }
        }
        let mut writer = SVGWriter::new();
        visual.do_it(false, false, false, &mut writer);
        let mut extent = Point::zero();
        for handle in visual.iter_nodes() {
            let (_, bottom_right) = visual.pos(handle).bbox(false);
            extent = Point::new(extent.x.max(bottom_right.x), extent.y.max(bottom_right.y));
        }
        (writer.finalize(), extent)
    }));
    match drawn {
        Ok((svg, extent)) => {
            let svg = svg.replace(
                "font-family: Times, serif;",
                "font-family: Helvetica, Arial, sans-serif;",
            );
            Ok(fit_svg_to(svg, extent))
        }
        Err(payload) => Err(GraphError::Layout(panic_message(payload.as_ref()))),
    }
}

/// The margin around the drawing, in pixels.
const SVG_MARGIN: f64 = 16.0;

/// Replaces the size layout-rs gives the document with the extent of the
/// nodes (layout-rs grows the height by ten pixels a character of every
/// label, which leaves a tall blank band under the drawing).
fn fit_svg_to(svg: String, extent: Point) -> String {
    let width = (extent.x + SVG_MARGIN).ceil();
    let height = (extent.y + SVG_MARGIN).ceil();
    if !(width.is_finite() && height.is_finite() && width > 0.0 && height > 0.0) {
        return svg;
    }
    let Some(start) = svg.find("<svg ") else {
        return svg;
    };
    let Some(length) = svg[start..].find('>') else {
        return svg;
    };
    let header = format!(
        "<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    let mut fitted = String::with_capacity(svg.len());
    fitted.push_str(&svg[..start]);
    fitted.push_str(&header);
    fitted.push_str(&svg[start + length + 1..]);
    fitted
}

fn svg_element(node: &Node) -> Element {
    let label = node.lines.join("\n");
    let longest = node
        .lines
        .iter()
        .map(|line| line.chars().count())
        .max()
        .unwrap_or(1)
        .max(1);
    let font = SVG_FONT_SIZE as f64;
    let mut size = Point::new(
        longest as f64 * font * SVG_CHARACTER_WIDTH + 2.0 * SVG_NODE_PADDING,
        node.lines.len().max(1) as f64 * font + 2.0 * SVG_NODE_PADDING,
    );
    let (fill, stroke) = node.kind.colours();
    let (shape, line_width, rounded) = match node.kind {
        NodeKind::Intent => {
            // The text sits in the ellipse's inner rectangle.
            size = Point::new(size.x * 1.3, size.y * 1.4);
            (ShapeKind::new_circle(&label), 1, 0)
        }
        NodeKind::Flow => (ShapeKind::new_box(&label), 3, 0),
        NodeKind::Reply => (ShapeKind::new_box(&label), 1, 12),
        _ => (ShapeKind::new_box(&label), 1, 0),
    };
    let look = StyleAttr::new(
        Color::fast(stroke),
        line_width,
        Some(Color::fast(fill)),
        rounded,
        SVG_FONT_SIZE,
    );
    let mut properties = format!(
        "id=\"{}\" class=\"node {}\"",
        node.element_id,
        node.kind.class()
    );
    if let Some(source) = &node.source {
        let _ = write!(properties, " data-source=\"{}\"", xml_attribute(source));
    }
    Element::create_with_properties(shape, look, Orientation::TopToBottom, size, properties)
}

fn svg_arrow(edge: &Edge) -> Arrow {
    let (colour, style, class) = if edge.dashed {
        ("#c62828", LineStyleKind::Dashed, "edge on_error")
    } else {
        ("#424242", LineStyleKind::Normal, "edge")
    };
    let look = StyleAttr::new(Color::fast(colour), 1, None, 0, SVG_EDGE_FONT_SIZE);
    Arrow::with_properties(
        LineEndKind::None,
        LineEndKind::Arrow,
        style,
        &edge.label,
        &look,
        format!("class=\"{class}\""),
        &None,
        &None,
    )
}

/// Text for inside a double-quoted XML attribute.
fn xml_attribute(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            character if character.is_control() => escaped.push(' '),
            character => escaped.push(character),
        }
    }
    escaped
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "the layout panicked".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::check::check_project;

    /// The project at the repository root, compiled.
    fn shipped_project() -> CompiledProject {
        let checked = check_project(Path::new(env!("CARGO_MANIFEST_DIR")), &HashMap::new());
        checked.project.expect("the shipped project compiles")
    }

    /// A one-file project using every kind of step.
    fn project_with_every_step_kind() -> CompiledProject {
        const FLOW_FILE: &str = r#"
intents:
  hello:
    keywords: [hello]
classifier:
  fallback: hello
services:
  s:
    url: http://127.0.0.1:9/s
flows:
  f:
    intent: hello
    on_error:
      reply: "Sorry <&> \"quoted\" | #1"
      route: broken
    steps:
      - switch: channel
        cases:
          web:
            - { id: a, call: s }
          "odd \"case\" <x>": []
        default:
          - if: "input.go"
            then:
              - set: { first: "1", second: "2" }
            else:
              - reply: "no"
                route: not_going
      - parallel:
          - { id: b, call: s }
          - { id: c, call: s }
      - id: lines
        foreach: input.items
        as: line
        do:
          - { id: priced, call: s, body: { sku: "{{ line.sku }}" } }
      - reply: done
        decision: end
"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("flows")).unwrap();
        std::fs::write(dir.path().join("flows/main.yaml"), FLOW_FILE).unwrap();
        let checked = check_project(dir.path(), &HashMap::new());
        checked
            .project
            .unwrap_or_else(|| panic!("compiles: {:#?}", checked.diagnostics))
    }

    fn step_indexes(steps: &[Step], into: &mut Vec<u32>) {
        for step in steps {
            into.push(step.index);
            step_indexes(&step.otherwise, into);
            match &step.action {
                Action::Call(call) => step_indexes(call.on_error.as_deref().unwrap_or(&[]), into),
                Action::Then(steps) | Action::Parallel(steps) => step_indexes(steps, into),
                Action::Switch(switch) => {
                    for (_, steps) in &switch.cases {
                        step_indexes(steps, into);
                    }
                    step_indexes(&switch.default, into);
                }
                Action::Foreach(foreach) => step_indexes(&foreach.steps, into),
                Action::Reply(_) | Action::Set(_) => {}
            }
        }
    }

    fn flow_step_indexes(project: &CompiledProject, name: &str) -> Vec<u32> {
        let flow = project.flows.iter().find(|flow| flow.name == name).unwrap();
        let mut indexes = Vec::new();
        step_indexes(&flow.steps, &mut indexes);
        step_indexes(flow.on_error.as_deref().unwrap_or(&[]), &mut indexes);
        indexes
    }

    /// Parses DOT with layout-rs's own parser, then lays it out.
    fn assert_dot_parses_and_lays_out(dot: &str) {
        let mut parser = layout::gv::DotParser::new(dot);
        let ast = match parser.process() {
            Ok(ast) => ast,
            Err(error) => panic!("DOT does not parse: {error}\n{dot}"),
        };
        let mut builder = layout::gv::GraphBuilder::new();
        builder.visit_graph(&ast);
        let mut visual = builder.get();
        let mut writer = SVGWriter::new();
        visual.do_it(false, false, false, &mut writer);
        assert!(writer.finalize().contains("<svg"));
    }

    #[test]
    fn every_step_of_the_menu_flow_has_its_id_in_the_svg() {
        let project = shipped_project();
        let svg = render(&project, Some("menu"), GraphFormat::Svg).unwrap();
        assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("viewBox=\"0 0 "));
        let indexes = flow_step_indexes(&project, "menu");
        assert!(!indexes.is_empty());
        for index in indexes {
            assert!(
                svg.contains(&format!("id=\"step-{index}\" class=\"node ")),
                "step {index} is missing"
            );
        }
        assert!(svg.contains("id=\"flow-menu\" class=\"node flow\""));
        assert!(svg.contains("id=\"intent-menu\" class=\"node intent\""));
        // Only the menu flow.
        assert!(!svg.contains("id=\"flow-order\""));
    }

    #[test]
    fn the_whole_project_draws_as_svg_with_every_flow() {
        let project = shipped_project();
        let svg = render(&project, None, GraphFormat::Svg).unwrap();
        for flow in &project.flows {
            assert!(svg.contains(&format!("id=\"flow-{}\"", flow.name)));
        }
        for intent in &project.intents {
            assert!(svg.contains(&format!("id=\"intent-{}\"", intent.name)));
        }
    }

    #[test]
    fn the_order_flow_in_mermaid_has_its_on_error_edge() {
        let project = shipped_project();
        let mermaid = render(&project, Some("order"), GraphFormat::Mermaid).unwrap();
        assert!(mermaid.starts_with("flowchart TD\n"));
        assert!(mermaid.contains("    i_order --> f_order\n"));
        let flow = project
            .flows
            .iter()
            .find(|flow| flow.name == "order")
            .unwrap();
        let (call, on_error) = flow
            .steps
            .iter()
            .find_map(|step| match &step.action {
                Action::Call(call) => Some((step.index, call.on_error.as_ref()?)),
                _ => None,
            })
            .unwrap();
        let on_error_first = on_error[0].index;
        assert!(
            mermaid.contains(&format!(
                "    s{call} -.->|\"on_error\"| s{on_error_first}\n"
            )),
            "{mermaid}"
        );
        assert!(mermaid.contains(&format!(
            "    s{on_error_first}(\"reply order_error (error)\")\n"
        )));
        assert!(mermaid.contains("linkStyle "));
    }

    #[test]
    fn dot_of_the_shipped_project_parses_with_layout_rs() {
        let project = shipped_project();
        let dot = render(&project, None, GraphFormat::Dot).unwrap();
        assert!(dot.starts_with("digraph flows {\n    rankdir=TB;\n"));
        assert!(dot.contains("id=\"flow-menu\""));
        assert!(dot.contains("style=\"dashed\""));
        assert_dot_parses_and_lays_out(&dot);
    }

    #[test]
    fn an_unknown_flow_suggests_the_closest_name() {
        let project = shipped_project();
        let error = render(&project, Some("menuu"), GraphFormat::Mermaid).unwrap_err();
        assert_eq!(
            error,
            GraphError::UnknownFlow {
                name: "menuu".to_owned(),
                suggestion: Some("menu".to_owned()),
            }
        );
        assert_eq!(
            error.to_string(),
            "there is no flow named `menuu`; did you mean `menu`?"
        );
        let error = render(&project, Some("zzz"), GraphFormat::Dot).unwrap_err();
        assert_eq!(
            error,
            GraphError::UnknownFlow {
                name: "zzz".to_owned(),
                suggestion: None,
            }
        );
    }

    #[test]
    fn every_step_kind_is_drawn_with_its_branches() {
        let project = project_with_every_step_kind();
        let mermaid = render(&project, Some("f"), GraphFormat::Mermaid).unwrap();
        let flow = &project.flows[0];
        let [switch, parallel, foreach, last] = &flow.steps[..] else {
            panic!("four steps: {:#?}", flow.steps);
        };
        let Action::Switch(switch_action) = &switch.action else {
            panic!("a switch");
        };
        let web_call = switch_action.cases[0].1[0].index;
        let conditional = &switch_action.default[0];
        let Action::Then(then_steps) = &conditional.action else {
            panic!("a then");
        };
        let set = then_steps[0].index;
        let else_reply = conditional.otherwise[0].index;
        let Action::Parallel(branches) = &parallel.action else {
            panic!("a parallel");
        };
        let Action::Foreach(foreach_action) = &foreach.action else {
            panic!("a foreach");
        };
        let body = foreach_action.steps[0].index;
        let flow_on_error = flow.on_error.as_ref().unwrap()[0].index;
        let (s, p, fe, r) = (switch.index, parallel.index, foreach.index, last.index);
        for expected in [
            format!("f_f --> s{s}\n"),
            format!("s{s} -->|\"web\"| s{web_call}\n"),
            format!("s{web_call} --> s{p}\n"),
            // An empty case goes straight on to the next step.
            format!("s{s} -->|\"odd #quot;case#quot; #lt;x#gt;\"| s{p}\n"),
            format!("s{s} -->|\"default\"| s{}\n", conditional.index),
            format!("s{} -->|\"then\"| s{set}\n", conditional.index),
            format!("s{} -->|\"else\"| s{else_reply}\n", conditional.index),
            format!("s{set} --> s{p}\n"),
            format!("s{p} --> s{}\n", branches[0].index),
            format!("s{p} --> s{}\n", branches[1].index),
            format!("s{} --> s{fe}\n", branches[0].index),
            format!("s{} --> s{fe}\n", branches[1].index),
            format!("s{fe} -->|\"each\"| s{body}\n"),
            format!("s{body} -->|\"next\"| s{fe}\n"),
            format!("s{fe} -->|\"done\"| s{r}\n"),
            format!("f_f -.->|\"on_error\"| s{flow_on_error}\n"),
            format!("s{s}{{{{\"switch\"}}}}\n"),
            format!(
                "s{}[\"if … (main.yaml:{})<br/>then\"]\n",
                conditional.index, conditional.source.line
            ),
            format!("s{}[\"set first, second\"]\n", then_steps[0].index),
            format!("s{fe}[\"foreach line<br/>id: lines\"]\n"),
            format!("s{r}(\"reply f (end)\")\n"),
            format!("s{else_reply}(\"reply not_going\")\n"),
        ] {
            assert!(
                mermaid.contains(&expected),
                "missing {expected:?} in\n{mermaid}"
            );
        }
        // A reply ends its path.
        assert!(!mermaid.contains(&format!("s{else_reply} -")));
        assert!(!mermaid.contains(&format!("s{r} -")));

        let dot = render(&project, None, GraphFormat::Dot).unwrap();
        assert!(dot.contains("label=\"odd \\\"case\\\" <x>\""), "{dot}");
        assert_dot_parses_and_lays_out(&dot);

        let svg = render(&project, None, GraphFormat::Svg).unwrap();
        for index in flow_step_indexes(&project, "f") {
            assert!(
                svg.contains(&format!("id=\"step-{index}\"")),
                "step {index}"
            );
        }
        assert!(svg.contains("odd &quot;case&quot; &lt;x&gt;"));
        assert!(svg.contains("class=\"edge on_error\""));
    }

    #[test]
    fn text_is_escaped_for_each_format() {
        assert_eq!(
            mermaid_text("a \"b\" <c> & #d | `e`"),
            "a #quot;b#quot; #lt;c#gt; #amp; #35;d #124; #96;e#96;"
        );
        assert_eq!(dot_text("a \"b\" \\c\nd"), "a \\\"b\\\" \\\\c\\nd");
        assert_eq!(xml_attribute("a\"<&>'"), "a&quot;&lt;&amp;&gt;&apos;");
        assert_eq!(
            escape_name("track order-é", false),
            "track_20_order_2d__e9_"
        );
        assert_eq!(escape_name("track-order", true), "track-order");
        assert_eq!(shorten_to("abcdef", 4), "abc…");
    }

    #[test]
    fn names_that_escape_alike_still_get_unique_ids() {
        let mut used = HashSet::new();
        assert_eq!(unique(&mut used, "f_a".to_owned(), '_'), "f_a");
        assert_eq!(unique(&mut used, "f_a".to_owned(), '_'), "f_a_2");
        assert_eq!(unique(&mut used, "f_a".to_owned(), '_'), "f_a_3");
    }

    #[test]
    fn an_empty_graph_is_still_a_document() {
        let svg = write_svg(&FlowGraph::default()).unwrap();
        assert!(svg.contains("<svg") && svg.contains("viewBox"));
        assert_eq!(write_mermaid(&FlowGraph::default()), "flowchart TD\n");
        // layout-rs itself panics on an empty graph ("Sorting an empty
        // graph"), which is why `write_svg` never lays one out.
        let dot = write_dot(&FlowGraph::default());
        assert!(layout::gv::DotParser::new(&dot).process().is_ok(), "{dot}");
    }
}
