//! Who inside an org may see an event or a job, and which topics a subscriber asked for (API.md
//! "Audiences and topics"). [`Audience::admits`] and [`Topics::admits`] are THE predicate: live
//! fan-out, replay, gap repair, `Poll`, `GetJob`, `ListJobs`, `UpdateJob` and `DeleteJob` all
//! call them, so a rule can never differ between live and replay. An audience is stored with its
//! event (the log's `audience` column) and in its job's row ([`stored`] has the text form); a
//! [`Viewer`] is a caller as its token describes it. Checking an event costs O(size of its
//! audience) string comparisons and binary searches, with no allocation.
use std::{
    cell::Cell,
    collections::HashSet,
    sync::{Arc, LazyLock},
};

use orgpulse::proto;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::validate::Invalid;

/// Most `user_ids`, `groups` and `roles` of an audience.
pub const MAX_AUDIENCE_USERS: usize = 100;
pub const MAX_AUDIENCE_GROUPS: usize = 32;
pub const MAX_AUDIENCE_ROLES: usize = 8;
/// Most groups a token may carry (more: UNAUTHENTICATED "too many groups").
pub const MAX_TOKEN_GROUPS: usize = 256;
/// Most role names of a token that are kept (only the first this many can match an audience).
pub const MAX_TOKEN_ROLES: usize = 64;
/// Most topics of an event (or a job).
pub const MAX_EVENT_TOPICS: usize = 8;
/// Most topics one subscription or Poll may name.
pub const MAX_FILTER_TOPICS: usize = 100;
/// Longest group, role or topic name.
pub const MAX_NAME: usize = 128;

/// A sorted, deduplicated set of names (groups, roles, topics), searched without allocating;
/// empty costs no allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names(Option<Arc<[Box<str>]>>);

impl Names {
    pub fn new<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Names {
        let mut list: Vec<Box<str>> = names.into_iter().map(|n| n.as_ref().into()).collect();
        if list.is_empty() {
            return Names(None);
        }
        list.sort_unstable();
        list.dedup();
        Names(Some(list.into()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.0
            .as_ref()
            .is_some_and(|l| l.binary_search_by(|n| (**n).cmp(name)).is_ok())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(|l| l.iter().map(|n| &**n))
    }
}

/// A caller as its token describes it: what an audience is checked against.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub user: Arc<str>,
    pub groups: Names,
    /// Every role name of the token (not only the four the API defines).
    pub roles: Names,
    /// Role `service`: sees everything.
    pub sees_all: bool,
}

impl Viewer {
    /// A caller that sees everything (role service): the server's own writers.
    pub fn service(user: &str) -> Viewer {
        Viewer {
            user: user.into(),
            groups: Names::default(),
            roles: Names::new(["service"]),
            sees_all: true,
        }
    }
}

/// Who may see an event or a job; never empty (no audience = the whole org).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audience {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

impl Audience {
    /// Only `user` (a notification's or an entity change's `user_id`).
    pub fn one_user(user: &str) -> Audience {
        Audience {
            user_ids: vec![user.to_string()],
            groups: vec![],
            roles: vec![],
        }
    }

    /// A request's audience, widened by its one-user field `user` when that is not empty;
    /// `None` = the whole org. Checks the limits of API.md.
    pub fn from_request(
        a: Option<&proto::Audience>,
        user: &str,
    ) -> Result<Option<Audience>, Invalid> {
        let a = a.map_or_else(Audience::default, |a| Audience {
            user_ids: a.user_ids.clone(),
            groups: a.groups.clone(),
            roles: a.roles.clone(),
        });
        a.widened_by(user)
    }

    /// An outbox row's `audience` (a JSON object with the request's field names), widened by
    /// its `user_id` like [`Audience::from_request`].
    pub fn from_json(json: &str, user: &str) -> Result<Option<Audience>, Invalid> {
        // serde would also take an array for the struct's fields, in order.
        if !json.trim_start().starts_with('{') {
            return Err(Invalid::new("audience must be a JSON object"));
        }
        let a: Audience =
            serde_json::from_str(json).map_err(|e| Invalid::new(format!("audience: {e}")))?;
        a.widened_by(user)
    }

    fn widened_by(mut self, user: &str) -> Result<Option<Audience>, Invalid> {
        if !user.is_empty() && !self.user_ids.iter().any(|u| u == user) {
            self.user_ids.push(user.to_string());
        }
        self.check()?;
        Ok((!self.is_everyone()).then_some(self))
    }

    fn is_everyone(&self) -> bool {
        self.user_ids.is_empty() && self.groups.is_empty() && self.roles.is_empty()
    }

    fn check(&self) -> Result<(), Invalid> {
        for (field, list, max) in [
            ("audience.user_ids", &self.user_ids, MAX_AUDIENCE_USERS),
            ("audience.groups", &self.groups, MAX_AUDIENCE_GROUPS),
            ("audience.roles", &self.roles, MAX_AUDIENCE_ROLES),
        ] {
            if list.len() > max {
                return Err(Invalid::new(format!(
                    "{field} names {}; at most {max} allowed",
                    list.len()
                )));
            }
        }
        for u in &self.user_ids {
            crate::validate::id("audience.user_ids", u)?;
        }
        for g in &self.groups {
            name("audience.groups", g)?;
        }
        for r in &self.roles {
            crate::validate::id("audience.roles", r)?;
        }
        Ok(())
    }

    /// Whether `v` may see what this audience is on: its user is named, or one of its groups,
    /// or one of its roles; role service always.
    pub fn admits(&self, v: &Viewer) -> bool {
        v.sees_all
            || self.user_ids.iter().any(|u| **u == *v.user)
            || self.groups.iter().any(|g| v.groups.has(g))
            || self.roles.iter().any(|r| v.roles.has(r))
    }
}

/// Whether `v` may see what `audience` is on (`None` = the whole org).
pub fn admits(audience: Option<&Audience>, v: &Viewer) -> bool {
    audience.is_none_or(|a| a.admits(v))
}

/// The stored text of an audience: a user id alone when it names one user only (the form rows
/// written before audiences had, which older nodes read too), else its JSON object.
pub fn stored(a: &Audience) -> String {
    match a.user_ids.as_slice() {
        [one] if a.groups.is_empty() && a.roles.is_empty() => one.clone(),
        _ => serde_json::to_string(a).expect("an audience always serializes"),
    }
}

/// An audience from its [`stored`] text.
pub fn from_stored(text: &str) -> Result<Audience, String> {
    if text.starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("corrupt stored audience: {e}"))
    } else {
        Ok(Audience::one_user(text))
    }
}

/// A group or topic name: 1-128 characters of `[A-Za-z0-9._:@/-]`.
pub fn name(field: &str, v: &str) -> Result<(), Invalid> {
    if !v.is_empty()
        && v.len() <= MAX_NAME
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b))
    {
        Ok(())
    } else {
        Err(Invalid::new(format!(
            "{field} must be 1-{MAX_NAME} characters of [A-Za-z0-9._:@/-]"
        )))
    }
}

/// The topics of a new event or job: 0-8 valid names.
pub fn event_topics(field: &str, topics: &[String]) -> Result<(), Invalid> {
    if topics.len() > MAX_EVENT_TOPICS {
        return Err(Invalid::new(format!(
            "{field} names {} topics; at most {MAX_EVENT_TOPICS} allowed",
            topics.len()
        )));
    }
    topics.iter().try_for_each(|t| name(field, t))
}

/// The topics a subscription or a Poll asked for: an event matches when it has at least one of
/// them; empty = every event. Equal sets share one allocation (see [`TopicSets`]), so a fan-out
/// checks a set once for all the subscribers that asked for it ([`TopicsSeen`]).
#[derive(Debug, Clone, Default)]
pub struct Topics(Names);

impl Topics {
    pub fn from_request(topics: &[String]) -> Result<Topics, Invalid> {
        if topics.len() > MAX_FILTER_TOPICS {
            return Err(Invalid::new(format!(
                "topics names {} topics; at most {MAX_FILTER_TOPICS} allowed",
                topics.len()
            )));
        }
        topics.iter().try_for_each(|t| name("topics", t))?;
        Ok(Topics(TopicSets::share(Names::new(topics))))
    }

    /// Whether an event (or job) with `topics` matches.
    pub fn admits<'a>(&self, mut topics: impl Iterator<Item = &'a str>) -> bool {
        self.0.is_empty() || topics.any(|t| self.0.has(t))
    }

    /// [`Topics::admits`] for one event's fan-out, answered from `seen` when the subscriber
    /// before asked for the same (shared) set: at presence's 1,000 subscribers of one topic, one
    /// string comparison per event instead of 1,000, each behind a pointer of its own.
    pub fn admits_seen<'a>(
        &self,
        topics: impl Iterator<Item = &'a str>,
        seen: &TopicsSeen,
    ) -> bool {
        let Some(set) = &self.0.0 else {
            return true;
        };
        let ptr = Arc::as_ptr(set).cast::<()>();
        match seen.0.get() {
            Some((last, answer)) if last == ptr => answer,
            _ => {
                let answer = self.admits(topics);
                seen.0.set(Some((ptr, answer)));
                answer
            }
        }
    }
}

/// One event's answer for the topic set checked last in its fan-out, by the set's address. The
/// subscribers a fan-out offers the event to were all there when it began (the room's lock is
/// held) and each holds its set, so no two sets it meets can have had the same address.
#[derive(Default)]
pub struct TopicsSeen(Cell<Option<(*const (), bool)>>);

/// Every topic set a subscription asked for, once: equal sets share one allocation. A set no
/// subscription holds any more is dropped at the next sweep, made when the count doubled since
/// the last one (so the sets held here are at most twice the live ones, plus 1,024).
struct TopicSets {
    sets: HashSet<Arc<[Box<str>]>>,
    sweep_at: usize,
}

impl TopicSets {
    fn share(names: Names) -> Names {
        static SETS: LazyLock<Mutex<TopicSets>> = LazyLock::new(|| {
            Mutex::new(TopicSets {
                sets: HashSet::new(),
                sweep_at: 1024,
            })
        });
        let Some(set) = names.0 else {
            return names;
        };
        let mut shared = SETS.lock();
        if let Some(found) = shared.sets.get(&set) {
            return Names(Some(found.clone()));
        }
        if shared.sets.len() >= shared.sweep_at {
            shared.sets.retain(|s| Arc::strong_count(s) > 1);
            shared.sweep_at = (2 * shared.sets.len()).max(1024);
        }
        shared.sets.insert(set.clone());
        Names(Some(set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewer(user: &str, groups: &[&str], roles: &[&str]) -> Viewer {
        Viewer {
            user: user.into(),
            groups: Names::new(groups),
            roles: Names::new(roles),
            sees_all: roles.contains(&"service"),
        }
    }

    fn audience(users: &[&str], groups: &[&str], roles: &[&str]) -> Audience {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Audience {
            user_ids: v(users),
            groups: v(groups),
            roles: v(roles),
        }
    }

    #[test]
    fn a_viewer_is_admitted_by_its_user_one_of_its_groups_or_one_of_its_roles() {
        let a = audience(&["ann"], &["project:42"], &["auditor"]);
        assert!(a.admits(&viewer("ann", &[], &["member"])));
        assert!(a.admits(&viewer("bob", &["x", "project:42"], &["member"])));
        assert!(a.admits(&viewer("bob", &[], &["member", "auditor"])));
        assert!(a.admits(&viewer("svc", &[], &["service"])));
        assert!(!a.admits(&viewer("bob", &["project:4"], &["admin"])));
        assert!(admits(None, &viewer("bob", &[], &["viewer"])));
    }

    #[test]
    fn the_stored_form_reads_back_and_reads_the_old_one_user_rows() {
        for a in [
            Audience::one_user("bob"),
            audience(&["ann", "bob"], &[], &[]),
            audience(&[], &["g"], &["admin"]),
        ] {
            assert_eq!(from_stored(&stored(&a)).unwrap(), a);
        }
        assert_eq!(stored(&Audience::one_user("bob")), "bob");
        assert!(from_stored("{not json").is_err());
    }

    #[test]
    fn a_request_audience_is_widened_by_its_user_field_and_checked() {
        let a = proto::Audience {
            groups: vec!["g".into()],
            ..Default::default()
        };
        let got = Audience::from_request(Some(&a), "bob").unwrap().unwrap();
        assert_eq!(got, audience(&["bob"], &["g"], &[]));
        assert_eq!(Audience::from_request(None, "").unwrap(), None);
        assert_eq!(
            Audience::from_request(Some(&proto::Audience::default()), "").unwrap(),
            None
        );
        assert_eq!(
            Audience::from_request(None, "bob").unwrap(),
            Some(Audience::one_user("bob"))
        );
        let too_many = proto::Audience {
            groups: (0..33).map(|i| format!("g{i}")).collect(),
            ..Default::default()
        };
        assert!(Audience::from_request(Some(&too_many), "").is_err());
        let bad = proto::Audience {
            groups: vec!["no spaces".into()],
            ..Default::default()
        };
        assert!(Audience::from_request(Some(&bad), "").is_err());
        assert_eq!(
            Audience::from_json(r#"{"groups": ["g"]}"#, "bob").unwrap(),
            Some(audience(&["bob"], &["g"], &[]))
        );
        assert_eq!(Audience::from_json("{}", "").unwrap(), None);
        for bad in [r#"{"group": ["g"]}"#, r#"{"groups": "g"}"#, "null", "[]"] {
            assert!(Audience::from_json(bad, "").is_err(), "{bad}");
        }
    }

    #[test]
    fn topics_match_when_they_share_one_and_an_empty_filter_takes_all() {
        let t = Topics::from_request(&["project:42".into(), "board:1".into()]).unwrap();
        assert!(t.admits(["x", "board:1"].into_iter()));
        assert!(!t.admits(["x"].into_iter()));
        assert!(!t.admits(std::iter::empty()));
        assert!(Topics::default().admits(std::iter::empty()));
        assert!(Topics::from_request(&["a b".into()]).is_err());
    }

    #[test]
    fn equal_topic_sets_are_shared_and_a_fan_out_remembers_each_answer_by_set() {
        let topics = |t: &[&str]| {
            Topics::from_request(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let set = |t: &Topics| Arc::as_ptr(t.0.0.as_ref().unwrap()).cast::<()>();
        let (a1, a2) = (
            topics(&["job:1", "job:2"]),
            topics(&["job:2", "job:1", "job:1"]),
        );
        let b = topics(&["job:3"]);
        assert_eq!(set(&a1), set(&a2), "equal sets share one allocation");
        assert_ne!(set(&a1), set(&b));
        let seen = TopicsSeen::default();
        let event = || ["job:2"].into_iter();
        // Alternating sets: each answer is the set's own, not the one remembered before.
        for t in [&a1, &b, &a2, &b, &Topics::default(), &a1] {
            assert_eq!(t.admits_seen(event(), &seen), t.admits(event()));
        }
        assert!(a2.admits_seen(event(), &seen));
        assert!(!b.admits_seen(event(), &seen));
    }
}
