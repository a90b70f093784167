//! `[[teams]]`: which team an owner of a GPU (a Slurm job, a Kubernetes pod, a systemd
//! unit, a user, …; see [`crate::owner`]) belongs to, for showback.
//!
//! ```toml
//! [[teams]]
//! name = "vision"
//! slurm_account = "vision|cv-.*"   # Slurm jobs of these accounts
//! namespace = "vision-.*"          # Kubernetes pods in these namespaces
//!
//! [[teams]]
//! name = "platform"
//! unit = "inference-.*\\.service"  # systemd units
//! user = "svc-.*"                  # any owner whose process runs as such a user
//! ```
//!
//! Every rule is a regex matched against the whole value (anchored, as in Prometheus):
//! `slurm_account` the account of a Slurm job, `namespace` the namespace of a Kubernetes
//! pod, `unit` the unit of a systemd unit, `owner` the id of any owner (job id, pod, unit,
//! container id, user name), `user` the user of any owner. A value the agent could not
//! tell (empty: an account nobody wrote down, a pod whose namespace is unknown) matches no
//! rule. A team matches an owner when any of its rules does; the first team in file order
//! that matches wins, and an owner no team matches is [`UNASSIGNED`].
//!
//! Pure: no I/O. Parsed from the raw TOML tables by [`Teams::parse`] (errors are
//! `(team, field, message)`), which the aggregator config's parser wraps with the file.

use std::collections::HashMap;

use regex::Regex;

use super::selector::regex_error;
use crate::owner::{Owner, OwnerKind};

/// The team of time no `[[teams]]` rule claims (and of allocated time no owner explains):
/// reserved, a `[[teams]]` entry cannot take the name. Defined once, by the ledger.
pub use crate::ledger::UNASSIGNED;

/// The longest team name: it is a label value, a status page cell and a ledger key.
pub const MAX_TEAM_NAME_CHARS: usize = 128;

/// The rule keys of a `[[teams]]` entry, in the order of [`Field::ALL`].
pub const RULE_FIELDS: [&str; 5] = ["slurm_account", "user", "namespace", "unit", "owner"];

/// What a rule matches against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `slurm_account`: the account of a [`OwnerKind::SlurmJob`].
    SlurmAccount,
    /// `user`: the user of any owner.
    User,
    /// `namespace`: the namespace of a [`OwnerKind::K8sPod`].
    Namespace,
    /// `unit`: the id of a [`OwnerKind::SystemdUnit`].
    Unit,
    /// `owner`: the id of any owner.
    Owner,
}

impl Field {
    pub const ALL: [Field; 5] = [
        Field::SlurmAccount,
        Field::User,
        Field::Namespace,
        Field::Unit,
        Field::Owner,
    ];

    /// The key in `[[teams]]`.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::SlurmAccount => "slurm_account",
            Field::User => "user",
            Field::Namespace => "namespace",
            Field::Unit => "unit",
            Field::Owner => "owner",
        }
    }

    /// The owner's value this field looks at: `None` for an owner of another kind, or a
    /// value the agent could not tell (empty).
    fn value(self, o: &Owner) -> Option<&str> {
        let v = match self {
            Field::SlurmAccount if o.kind == OwnerKind::SlurmJob => &o.account,
            Field::Namespace if o.kind == OwnerKind::K8sPod => &o.namespace,
            Field::Unit if o.kind == OwnerKind::SystemdUnit => &o.id,
            Field::User => &o.user,
            Field::Owner => &o.id,
            _ => return None,
        };
        Some(v.as_str()).filter(|v| !v.is_empty())
    }
}

/// One rule: a field and its anchored regex, with the pattern as written.
#[derive(Debug, Clone)]
struct Rule {
    field: Field,
    pattern: String,
    re: Regex,
}

/// One `[[teams]]` entry, validated.
#[derive(Debug, Clone)]
pub struct Team {
    pub name: String,
    rules: Vec<Rule>,
}

impl Team {
    /// Whether any of the team's rules matches the owner.
    pub fn matches(&self, owner: &Owner) -> bool {
        self.rules
            .iter()
            .any(|r| r.field.value(owner).is_some_and(|v| r.re.is_match(v)))
    }

    /// The rules as written: `(field, pattern)`, in [`Field::ALL`] order.
    pub fn rules(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.rules
            .iter()
            .map(|r| (r.field.as_str(), r.pattern.as_str()))
    }
}

/// The `[[teams]]` of an aggregator config, in file order. Empty (the default): every
/// owner is [`UNASSIGNED`].
#[derive(Debug, Clone, Default)]
pub struct Teams {
    teams: Vec<Team>,
}

/// Which team a [`Teams::parse`] error is about: its name, or its index when the name
/// itself is the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeamRef {
    /// Displayed as `[[teams]] "vision"`.
    Name(String),
    /// Displayed as `teams[2]`.
    Index(usize),
}

impl std::fmt::Display for TeamRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TeamRef::Name(n) => write!(f, "[[teams]] {n:?}"),
            TeamRef::Index(i) => write!(f, "teams[{i}]"),
        }
    }
}

impl Teams {
    /// Validates the `[[teams]]` tables as written. Errors are `(team, field, message)`:
    /// an unknown key, a value that is not a string, an empty or reserved or duplicate
    /// name, a team without a rule, an empty or invalid regex.
    pub fn parse(raw: &[toml::Table]) -> Result<Self, (TeamRef, String, String)> {
        let mut teams: Vec<Team> = Vec::with_capacity(raw.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, table) in raw.iter().enumerate() {
            let at = |field: &str, message: String| (TeamRef::Index(i), field.to_string(), message);
            let name = match table.get("name") {
                None => return Err(at("name", "missing: every team needs a name".into())),
                Some(toml::Value::String(s)) => s.clone(),
                Some(v) => {
                    return Err(at(
                        "name",
                        format!("must be a string, got {}", v.type_str()),
                    ))
                }
            };
            if name.trim().is_empty() {
                return Err(at("name", "must not be empty".into()));
            }
            if name.trim() != name || name.chars().any(char::is_control) {
                return Err(at(
                    "name",
                    format!("{name:?} must not have surrounding spaces or control characters"),
                ));
            }
            if name.chars().count() > MAX_TEAM_NAME_CHARS {
                return Err(at(
                    "name",
                    format!("longer than {MAX_TEAM_NAME_CHARS} characters"),
                ));
            }
            let team = TeamRef::Name(name.clone());
            let err = |field: &str, message: String| (team.clone(), field.to_string(), message);
            if name.eq_ignore_ascii_case(UNASSIGNED) {
                return Err(err(
                    "name",
                    format!("{UNASSIGNED:?} is reserved: it is the team of time no rule claims"),
                ));
            }
            if let Some(first) = seen.get(&name) {
                return Err(err(
                    "name",
                    format!(
                        "duplicate team: teams[{i}] repeats teams[{first}] (list a team once; \
                         a rule takes alternatives, e.g. slurm_account = \"a|b\")"
                    ),
                ));
            }
            seen.insert(name.clone(), i);
            for key in table.keys() {
                if key != "name" && !RULE_FIELDS.contains(&key.as_str()) {
                    return Err(err(
                        key,
                        format!(
                            "unknown key, expected one of `name`, {}",
                            RULE_FIELDS.map(|f| format!("`{f}`")).join(", ")
                        ),
                    ));
                }
            }
            let mut rules = Vec::new();
            for field in Field::ALL {
                let key = field.as_str();
                let pattern = match table.get(key) {
                    None => continue,
                    Some(toml::Value::String(s)) => s,
                    Some(v) => {
                        return Err(err(
                            key,
                            format!("must be a string (a regex), got {}", v.type_str()),
                        ))
                    }
                };
                if pattern.is_empty() {
                    return Err(err(
                        key,
                        "must not be empty (leave the key out to match nothing on it)".into(),
                    ));
                }
                let re = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                    err(
                        key,
                        format!("invalid regex {pattern:?}: {}", regex_error(&e)),
                    )
                })?;
                rules.push(Rule {
                    field,
                    pattern: pattern.clone(),
                    re,
                });
            }
            if rules.is_empty() {
                return Err(err(
                    "name",
                    format!(
                        "the team has no rule: give at least one of {}",
                        RULE_FIELDS.join(", ")
                    ),
                ));
            }
            teams.push(Team { name, rules });
        }
        Ok(Self { teams })
    }

    /// The team of an owner: the first team in file order with a matching rule, else
    /// [`UNASSIGNED`]. Never fails.
    pub fn team_of(&self, owner: &Owner) -> &str {
        self.teams
            .iter()
            .find(|t| t.matches(owner))
            .map_or(UNASSIGNED, |t| t.name.as_str())
    }

    /// The teams in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, Team> {
        self.teams.iter()
    }

    pub fn len(&self) -> usize {
        self.teams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.teams.is_empty()
    }

    /// The team names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.teams.iter().map(|t| t.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn teams(text: &str) -> Result<Teams, String> {
        #[derive(serde::Deserialize)]
        struct F {
            #[serde(default)]
            teams: Vec<toml::Table>,
        }
        let f: F = toml::from_str(text).unwrap();
        Teams::parse(&f.teams).map_err(|(t, f, m)| format!("{t}: {f}: {m}"))
    }

    fn owner(kind: OwnerKind, id: &str, user: &str) -> Owner {
        Owner {
            kind,
            id: id.into(),
            user: user.into(),
            ..Owner::default()
        }
    }

    const RULES: &str = r#"
[[teams]]
name = "vision"
slurm_account = "vision|cv-.*"
namespace = "vision-.*"

[[teams]]
name = "platform"
unit = "inference-.*\\.service"
user = "svc-.*"

[[teams]]
name = "alice"
owner = "alice"
"#;

    #[test]
    fn each_field_matches_its_kind_of_owner_whole_and_first_team_wins() {
        let t = teams(RULES).unwrap();
        assert_eq!(
            t.names().collect::<Vec<_>>(),
            ["vision", "platform", "alice"]
        );
        let job = |account: &str, user: &str| Owner {
            account: account.into(),
            ..owner(OwnerKind::SlurmJob, "4242", user)
        };
        assert_eq!(t.team_of(&job("vision", "bob")), "vision");
        assert_eq!(t.team_of(&job("cv-3d", "bob")), "vision");
        // Anchored: a pattern never matches part of a value.
        assert_eq!(t.team_of(&job("supervision", "bob")), UNASSIGNED);
        assert_eq!(t.team_of(&job("vision2", "bob")), UNASSIGNED);
        // An account nobody wrote down matches no account rule; the user still counts.
        assert_eq!(t.team_of(&job("", "svc-batch")), "platform");
        // First team in file order wins: a vision job run by a service user is vision's.
        assert_eq!(t.team_of(&job("vision", "svc-batch")), "vision");
        let pod = |ns: &str| Owner {
            namespace: ns.into(),
            pod: "train-0".into(),
            ..owner(OwnerKind::K8sPod, &format!("{ns}/train-0"), "1000")
        };
        assert_eq!(t.team_of(&pod("vision-prod")), "vision");
        assert_eq!(t.team_of(&pod("default")), UNASSIGNED);
        // `namespace` is a pod's: a Slurm account named like a namespace is not matched by it.
        assert_eq!(t.team_of(&job("vision-prod", "bob")), UNASSIGNED);
        // `unit` is a systemd unit's id; a container with that id is not a unit.
        let unit = owner(OwnerKind::SystemdUnit, "inference-a.service", "root");
        assert_eq!(t.team_of(&unit), "platform");
        let container = owner(OwnerKind::Container, "inference-a.service", "root");
        assert_eq!(t.team_of(&container), UNASSIGNED);
        // `owner` is any owner's id: a login shell of alice.
        assert_eq!(
            t.team_of(&owner(OwnerKind::User, "alice", "alice")),
            "alice"
        );
        assert_eq!(t.team_of(&owner(OwnerKind::Unknown, "", "")), UNASSIGNED);
        // No teams: everything is unassigned.
        assert_eq!(Teams::default().team_of(&unit), UNASSIGNED);
        let rules: Vec<_> = t.iter().next().unwrap().rules().collect();
        assert_eq!(
            rules,
            [
                ("slurm_account", "vision|cv-.*"),
                ("namespace", "vision-.*")
            ]
        );
    }

    #[test]
    fn every_mistake_names_the_team_and_the_field() {
        let e = |text: &str| teams(text).unwrap_err();
        assert_eq!(
            e("[[teams]]\nname = \"vision\"\nslurm_account = \"(vision\"\n"),
            "[[teams]] \"vision\": slurm_account: invalid regex \"(vision\": unclosed group"
        );
        assert_eq!(
            e("[[teams]]\nname = \"a\"\nuser = \"x\"\n[[teams]]\nname = \"a\"\nuser = \"y\"\n"),
            "[[teams]] \"a\": name: duplicate team: teams[1] repeats teams[0] (list a team \
             once; a rule takes alternatives, e.g. slurm_account = \"a|b\")"
        );
        assert_eq!(
            e("[[teams]]\nname = \"a\"\nacount = \"x\"\n"),
            "[[teams]] \"a\": acount: unknown key, expected one of `name`, `slurm_account`, \
             `user`, `namespace`, `unit`, `owner`"
        );
        assert_eq!(
            e("[[teams]]\nname = \"\"\nuser = \"x\"\n"),
            "teams[0]: name: must not be empty"
        );
        assert_eq!(
            e("[[teams]]\nuser = \"x\"\n"),
            "teams[0]: name: missing: every team needs a name"
        );
        assert_eq!(
            e("[[teams]]\nname = 5\nuser = \"x\"\n"),
            "teams[0]: name: must be a string, got integer"
        );
        assert_eq!(
            e("[[teams]]\nname = \"a\"\n"),
            "[[teams]] \"a\": name: the team has no rule: give at least one of slurm_account, \
             user, namespace, unit, owner"
        );
        assert_eq!(
            e("[[teams]]\nname = \"unassigned\"\nuser = \"x\"\n"),
            "[[teams]] \"unassigned\": name: \"unassigned\" is reserved: it is the team of \
             time no rule claims"
        );
        assert!(e("[[teams]]\nname = \"Unassigned\"\nuser = \"x\"\n").contains("reserved"));
        assert_eq!(
            e("[[teams]]\nname = \"a\"\nuser = \"\"\n"),
            "[[teams]] \"a\": user: must not be empty (leave the key out to match nothing on it)"
        );
        assert_eq!(
            e("[[teams]]\nname = \"a\"\nunit = [\"x\"]\n"),
            "[[teams]] \"a\": unit: must be a string (a regex), got array"
        );
        assert!(e("[[teams]]\nname = \" a\"\nuser = \"x\"\n").contains("surrounding spaces"));
        assert!(teams("").unwrap().is_empty());
    }

    fn any_owner() -> impl Strategy<Value = Owner> {
        // A small alphabet, so values often equal the patterns.
        let s = "[ab-]{0,2}";
        (0..OwnerKind::ALL.len(), s, s, s, s, s).prop_map(|(k, id, user, account, ns, pod)| Owner {
            kind: OwnerKind::ALL[k],
            id,
            user,
            account,
            namespace: ns,
            pod,
            qos: String::new(),
        })
    }

    proptest! {
        /// Whatever the owner and the rules: no panic, and the team is the first
        /// configured team whose rule matches, or unassigned when none does.
        #[test]
        fn team_of_is_a_configured_team_or_unassigned(
            o in any_owner(),
            rules in prop::collection::vec((0..5usize, "[ab.*|()-]{1,3}"), 1..6),
        ) {
            let text: String = rules
                .iter()
                .enumerate()
                .map(|(i, (f, p))| format!("[[teams]]\nname = \"t{i}\"\n{} = '{p}'\n", RULE_FIELDS[*f]))
                .collect();
            let Ok(t) = teams(&text) else { return Ok(()) };
            let got = t.team_of(&o);
            match t.iter().position(|team| team.matches(&o)) {
                Some(i) => prop_assert_eq!(got, format!("t{i}")),
                None => prop_assert_eq!(got, UNASSIGNED),
            }
            prop_assert!(got == UNASSIGNED || t.names().any(|n| n == got));
            // Judged independently for teams whose patterns are all literal (no regex
            // syntax): a team matches exactly when one of its fields' values, of the
            // field's kind of owner, equals its pattern.
            for team in t.iter() {
                let literal = team
                    .rules()
                    .all(|(_, p)| p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
                if !literal {
                    continue;
                }
                let expected = team.rules().any(|(field, pattern)| {
                    let value = match field {
                        "slurm_account" if o.kind == OwnerKind::SlurmJob => &o.account,
                        "namespace" if o.kind == OwnerKind::K8sPod => &o.namespace,
                        "unit" if o.kind == OwnerKind::SystemdUnit => &o.id,
                        "user" => &o.user,
                        "owner" => &o.id,
                        _ => return false,
                    };
                    value == pattern
                });
                prop_assert_eq!(team.matches(&o), expected);
            }
        }
    }
}
