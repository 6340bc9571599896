//! Database URLs: parsing, checking, redaction (the password, and only the password, becomes
//! `***` wherever a URL is shown), and edits (another database; the test proxy's address).

use std::fmt;

use crate::error::ConfigError;

/// A validated `postgres://` URL. `Display` shows it with the password replaced by `***`, so it
/// can go into any message or log line; the secret itself is only handed to libpq.
///
/// The `url` crate parses it when it can. It cannot parse libpq's multi-host form
/// (`postgresql://u@h1:26257,h2:26257/db`, CockroachDB failover), which is therefore checked and
/// redacted as text.
#[derive(Clone)]
pub struct DbUrl {
    pub(super) full: String,
    parsed: Option<url::Url>,
    /// The password, wherever the URL carries it (`user:password@`, `?password=`), as written
    /// and percent-decoded: `redact_text` hides both in messages from libpq or the server.
    pub(super) secrets: Vec<String>,
    /// `SET`s each transfer session runs after connecting (`with_session_setting`).
    pub(super) session_settings: Vec<(&'static str, &'static str)>,
}

/// libpq's variables that say where a database is, which a psql user may rely on: a URL
/// without a host (`postgresql:///`) takes them.
const LIBPQ_VARIABLES: [&str; 6] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGSERVICE",
];

impl DbUrl {
    /// Resolves the URL: `--database-url`, else `DATABASE_URL` (which `.env` may set: see
    /// `load_dotenv`).
    pub fn resolve(flag: Option<&str>) -> Result<DbUrl, ConfigError> {
        if let Some(url) = flag {
            return DbUrl::parse(url);
        }
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => {
                if super::dotenv_url_shortened() {
                    // Not the name: it may be the rest of the password.
                    crate::say(format_args!(
                        "bank: warning: DATABASE_URL in .env has a '$' that .env replaces, \
                         with the name after it (letters and digits), by nothing, since no such \
                         variable is set: if the '$' is part of the password, put the URL in \
                         single quotes"
                    ));
                }
                DbUrl::parse(&url)
            }
            Err(std::env::VarError::NotUnicode(_)) => Err(ConfigError::MalformedUrl {
                url: "in DATABASE_URL".into(),
                reason: "it is not valid UTF-8".into(),
            }),
            // The URL was to come from .env, which could not be read: that is the error.
            _ => Err(
                super::dotenv_error().unwrap_or(if super::dotenv_url_shortened() {
                    ConfigError::DotEnvUrlEmpty
                } else {
                    ConfigError::MissingUrl {
                        libpq: LIBPQ_VARIABLES
                            .into_iter()
                            .filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
                            .collect(),
                    }
                }),
            ),
        }
    }

    pub fn parse(raw: &str) -> Result<DbUrl, ConfigError> {
        let raw = raw.trim();
        let secrets = secrets_of(raw);
        let malformed = |reason: &str| ConfigError::MalformedUrl {
            url: match raw.is_empty() {
                true => "(empty)".to_string(),
                false => redact(raw, &secrets),
            },
            reason: reason.to_string(),
        };
        let rest = raw
            .strip_prefix("postgres://")
            .or_else(|| raw.strip_prefix("postgresql://"))
            .ok_or_else(|| malformed("it must start with postgres:// or postgresql://"))?;
        if raw.chars().any(char::is_whitespace) {
            return Err(malformed("it contains whitespace"));
        }
        // libpq ends its userinfo at the first '@' that comes before any '/': a '?' or '#' does not
        // end it. "weird:5?a=b@host" reached libpq as the password "5?a=b" while bank took "5" for a
        // port and "?a=b@host/bank" for a query: the URL was accepted, shown with its password
        // in every message, and bank's own parameters, appended after "&", became part of the
        // database name ("bank&connect_timeout=5&…" does not exist).
        if libpq_userinfo(rest).is_some_and(|userinfo| userinfo.contains(['?', '#'])) {
            return Err(malformed(
                "libpq takes everything before its first '@' for the user and password when no '/' \
                 comes first: write '?' and '#' in a password percent-encoded, as %3F and %23, and \
                 an '@' in a parameter as %40",
            ));
        }
        // With a '/' before the '@', libpq finds no userinfo: "weird:?SEKa=SEKb/SEKc@host" is
        // host "weird", an empty port and a query whose first key ("SEKa", the password's) it
        // refuses, quoting it, and bank showed the URL whole, password and all. A key libpq
        // does not know, with an '@' after it, may be a piece of a password: refused here, and
        // not shown.
        if libpq_userinfo(rest).is_none() && unknown_key_before_an_at(rest) {
            return Err(malformed(
                "its query has a parameter libpq does not know with an '@' after it, which may be \
                 part of a password (not shown: libpq takes a user and password only from before \
                 an '@' with no '/' before it): write '?', '/' and '@' in a password \
                 percent-encoded, as %3F, %2F and %40",
            ));
        }
        let authority = authority_of(rest);
        // libpq ends the user and password at the first '@', the url crate (and the redaction)
        // at the last: "bank:pa@ss@host" reached libpq as host "ss@host", and its error message
        // showed that piece of the password.
        if authority.matches('@').count() > 1 {
            return Err(malformed(
                "the user or password contains '@': write it percent-encoded, as %40",
            ));
        }
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        // No host: libpq's defaults decide (a `host=` parameter, PGHOST, a service file, the
        // Unix socket), as for psql; `postgresql://user@/db` is refused by the url crate, so such
        // a URL is checked as text, as the multi-host form.
        // `postgres://u@:5432/db?host=/tmp` (a port, no host: the socket directory comes in the
        // query) is psql's too; the url crate refuses it ("empty host").
        let no_host = hosts.is_empty() || hosts.starts_with(':');
        // "bank:pa/ss@host": an unencoded '/', '?' or '#' ends the authority for libpq and the url
        // crate, so the host became "bank" and the port "pa": the message blamed the port, and
        // libpq's own quoted "pa", a piece of the password.
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if userinfo.contains(['/', '?', '#']) {
                return Err(malformed(
                    "the user or password contains '/', '?' or '#': write them \
                     percent-encoded, as %2F, %3F and %23",
                ));
            }
        }
        // An IPv6 address with its zone (`[fe80::1%25eth0]`, a link-local address) is libpq's
        // to read: the url crate refuses zones ("invalid IPv6 address"), psql takes them.
        let zoned = hosts.starts_with('[') && hosts.contains('%');
        let parsed = if hosts.contains(',') || no_host || zoned {
            // libpq's list of hosts: each host:port must be sound.
            for host_port in hosts.split(',') {
                check_port(host_port).map_err(&malformed)?;
            }
            None
        } else {
            let url = url::Url::parse(raw).map_err(|e| match e {
                url::ParseError::InvalidPort => malformed(PORT),
                e => malformed(&e.to_string()),
            })?;
            if url.port() == Some(0) {
                return Err(malformed(PORT));
            }
            Some(url)
        };
        // libpq's `port=` parameter, one port or one per host.
        let query = rest.split_once('?').map_or("", |(_, q)| q);
        for pair in query.split('&') {
            if let Some(("port", ports)) = pair.split_once('=') {
                // An empty entry is the default port, as libpq takes it.
                if !ports.split(',').all(|p| p.is_empty() || is_port(p)) {
                    return Err(malformed(PORT));
                }
            }
        }
        // libpq refuses a parameter without '=', or one it does not know, and quotes it: after
        // `password=`, that is the rest of a password holding '&' ("?password=SEKa&SEKb":
        // "missing key/value separator \"=\" in URI query parameter: \"SEKb\"", and bank
        // showed the URL as "?password=***&SEKb="). Refused here, the pieces hidden.
        if !password_pieces(query).is_empty() {
            return Err(malformed(
                "the password parameter's value holds '&': write it percent-encoded, as %26",
            ));
        }
        Ok(DbUrl {
            full: raw.to_string(),
            parsed,
            secrets,
            session_settings: Vec::new(),
        })
    }

    /// Removes the password from `text` (an error message from libpq or the server, say).
    pub fn redact_text(&self, text: &str) -> String {
        redact(text, &self.secrets)
    }

    pub fn password(&self) -> Option<&str> {
        self.secrets.first().map(String::as_str)
    }

    /// The same server, another database (tests and benchmarks use scratch databases).
    pub fn with_database(&self, database: &str) -> DbUrl {
        if let Some(url) = &self.parsed {
            let mut url = url.clone();
            url.set_path(&format!("/{database}"));
            return self.edited(url);
        }
        let (base, query) = match self.full.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (self.full.as_str(), None),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
        let root = path_start.map_or(base, |i| &base[..i]);
        let mut full = format!("{root}/{database}");
        if let Some(q) = query {
            full.push('?');
            full.push_str(q);
        }
        DbUrl {
            full,
            parsed: None,
            secrets: self.secrets.clone(),
            session_settings: self.session_settings.clone(),
        }
    }

    /// The host and port of a one-host URL (5432 when it names none).
    pub fn host_port(&self) -> Option<(String, u16)> {
        let url = self.parsed.as_ref()?;
        Some((url.host_str()?.to_string(), url.port().unwrap_or(5432)))
    }

    /// The same URL to another host and port, with `params` added (a one-host URL only: the test
    /// proxy stands in for the server with this).
    pub fn via(&self, host: &str, port: u16, params: &[(&str, &str)]) -> Option<DbUrl> {
        let mut url = self.parsed.clone()?;
        url.set_host(Some(host)).ok()?;
        url.set_port(Some(port)).ok()?;
        for (name, value) in params {
            url.query_pairs_mut().append_pair(name, value);
        }
        Some(self.edited(url))
    }

    fn edited(&self, url: url::Url) -> DbUrl {
        DbUrl {
            full: url.to_string(),
            parsed: Some(url),
            secrets: self.secrets.clone(),
            session_settings: self.session_settings.clone(),
        }
    }

    /// The same URL, whose transfer sessions (`Session`) also run `SET name = value` after
    /// connecting: names and values are `bank`'s own constants, never user input.
    pub fn with_session_setting(&self, name: &'static str, value: &'static str) -> DbUrl {
        let mut url = self.clone();
        url.session_settings.push((name, value));
        url
    }

    /// The raw URL, password included: only for handing to another program (tests, scripts).
    pub fn expose(&self) -> &str {
        &self.full
    }
}

/// The URL with its password, and only its password, replaced by `***`.
impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // libpq has no fragments: what the url crate takes for one is the rest of the last
        // parameter's value, maybe a password's ("?password=SEC#RET"), so the text is redacted.
        let parsed = self.parsed.as_ref().filter(|url| url.fragment().is_none());
        let Some(url) = parsed else {
            // Taken as text: a control character in it would reach the terminal raw (the url
            // crate percent-encodes what it parses).
            return f.write_str(&crate::text::escaped(&redact_structurally(&self.full)));
        };
        let mut shown = url.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        if let Some((name, _)) = split_user(url.username()) {
            let _ = shown.set_username(&format!("{name}***"));
        }
        let user_with_secret = |k: &str, v: &str| is_user_key(k) && split_user(v).is_some();
        if url
            .query_pairs()
            .any(|(k, v)| is_password_key(&k) || user_with_secret(&k, &v))
        {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| match is_password_key(&k) {
                    // No value: the '=' was left out, and the key holds the password.
                    true if v.is_empty() && !secrets_in_key(&k).is_empty() => {
                        (password_prefix(&k).to_string(), "***".to_string())
                    }
                    true => (k.into_owned(), "***".to_string()),
                    false => match split_user(&v).filter(|_| is_user_key(&k)) {
                        Some((name, _)) => (k.into_owned(), format!("{name}***")),
                        None => (k.into_owned(), v.into_owned()),
                    },
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        // The query's `***` stays readable, not percent-encoded.
        f.write_str(&shown.as_str().replace("%2A%2A%2A", "***"))
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

/// `user:password@host…`: the part after `scheme://` up to the path or query.
fn authority_of(rest: &str) -> &str {
    // The userinfo ends at the last '@' that is not in a parameter's value, so an unencoded
    // '/' or '?' in a password is still inside it, and "?user=a@b" is not.
    let end = |s: &str| s.find(['/', '?']).unwrap_or(s.len());
    let at = rest
        .match_indices('@')
        .map(|(i, _)| i)
        .rfind(|&i| !in_query(&rest[..i]));
    match at {
        Some(i) => &rest[..i + 1 + end(&rest[i + 1..])],
        None => &rest[..end(rest)],
    }
}

/// Whether the query (from the first '?') has a key that libpq does not know (it refuses the
/// URL then) with an '@' somewhere after it.
fn unknown_key_before_an_at(rest: &str) -> bool {
    let Some((_, query)) = rest.split_once('?') else {
        return false;
    };
    let mut offset = 0;
    for pair in query.split('&') {
        let key = percent_decoded(pair.split('=').next().unwrap_or_default());
        let known = key.is_empty() || LIBPQ_KEYWORDS.contains(&key.as_str()) || key == "ssl";
        if !known && query[offset..].contains('@') {
            return true;
        }
        offset += pair.len() + 1;
    }
    false
}

/// The userinfo as libpq reads it (`conninfo_uri_parse_options`): up to the first '@', when no
/// '/' comes before it. A '?' or '#' does not end it, as it does for the url crate.
fn libpq_userinfo(rest: &str) -> Option<&str> {
    let stop = rest.find(['@', '/'])?;
    (rest[stop..].starts_with('@')).then(|| &rest[..stop])
}

/// Whether an '@' that follows `before` sits in the query: after a path or '?', a '?' and
/// then a `key=`. (A password with '/', '?' and '=' in that order reads as a query, as libpq
/// reads it; one with '?' before any '/' is libpq's password whole: `libpq_userinfo`.)
fn in_query(before: &str) -> bool {
    before
        .find(['/', '?'])
        .and_then(|cut| before[cut..].find('?').map(|q| &before[cut + q..]))
        .is_some_and(|query| query.contains('='))
}

/// One `host:port` of a URL: the port, if any, must be a number (an IPv6 `[…]` has colons).
const PORT: &str = "the port is not a number from 1 to 65535";

/// Whether `port` is one libpq takes (1 to 65535).
fn is_port(port: &str) -> bool {
    port.parse::<u16>().is_ok_and(|p| p > 0)
}

fn check_port(host_port: &str) -> Result<(), &'static str> {
    // libpq reads up to the ']' and, without one, refuses the URL; that is bad input, not a
    // connection to retry.
    if host_port.starts_with('[') && !host_port.contains(']') {
        return Err("an IPv6 address in [...] has no closing ']'");
    }
    if let Some((_, port)) = host_port.rsplit_once(':') {
        if !port.is_empty() && !host_port.ends_with(']') && !is_port(port) {
            return Err(PORT);
        }
    }
    Ok(())
}

/// A URL the `url` crate cannot parse, with the password of its userinfo and of a `password=`
/// parameter replaced by `***`, and nothing else touched.
fn redact_structurally(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return raw.to_string();
    };
    let authority = authority_of(rest);
    let tail = &rest[authority.len()..];
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if is_password_key(key) => format!("{key}=***"),
                    Some((key, value)) if is_user_key(key) => match split_user(value) {
                        Some((name, _)) => format!("{key}={name}***"),
                        None => pair.to_string(),
                    },
                    None if !secrets_in_key(pair).is_empty() => {
                        format!("{}***", password_prefix(pair))
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// The secrets in a URL: the password of `scheme://user:password@host/...` and the value of a
/// `password=` parameter. The userinfo ends at the last `@`, so an unencoded `/`, `?` or `@` in a
/// password is still caught (at worst more than the password is hidden).
fn secrets_of(raw: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let rest = raw.split_once("://").map_or(raw, |(_, r)| r);
    if let Some((userinfo, _)) = authority_of(rest).rsplit_once('@') {
        // A user name with an encoded colon keeps its own "password" even when a real one
        // follows: the server's refusal quotes the user name decoded.
        match userinfo.split_once(':') {
            Some((user, password)) => {
                secrets.push(password.to_string());
                secrets.extend(secrets_in_user(user));
            }
            None => secrets.extend(secrets_in_user(userinfo)),
        }
    }
    // libpq's own reading of the userinfo ("weird:5?a=b@host": the password "5?a=b", where the
    // reading above ends the authority at the '?' and finds no password at all).
    if let Some((_, password)) = libpq_userinfo(rest).and_then(|u| u.split_once(':')) {
        secrets.push(password.to_string());
    }
    // What libpq reads: its userinfo ends at the first '/', and without an '@' before it, the
    // password sits where a port goes ("bank:pa/ss@h", "bank:Sekr3t/bank" with the '@host'
    // left out or cut off by a .env comment). What is there and is no port is not shown.
    let head = &rest[..rest.find('/').unwrap_or(rest.len())];
    if !head.contains('@') {
        for host_port in head[..head.find('?').unwrap_or(head.len())].split(',') {
            match host_port.split_once(':') {
                Some((_, tail)) if !host_port.starts_with('[') && !is_port(tail) => {
                    secrets.push(tail.to_string())
                }
                _ => {}
            }
        }
    }
    if let Some((_, query)) = rest.split_once('?') {
        let pieces = password_pieces(query);
        for pair in query.split('&') {
            match pair.split_once('=') {
                // The rest of a password that holds '&' ("?password=SEKa&SEKb"), which libpq's
                // refusal quotes: the piece whole, and its key and value.
                _ if pieces.contains(&pair) => {
                    secrets.push(pair.to_string());
                    secrets.extend(
                        pair.split_once('=')
                            .map(|(k, v)| [k, v])
                            .into_iter()
                            .flatten()
                            .map(str::to_string),
                    );
                }
                Some((key, value)) if is_password_key(key) => secrets.push(value.to_string()),
                // `user=name:secret`, the colon written or encoded: the part after it.
                Some((key, value)) if is_user_key(key) => secrets.extend(secrets_in_user(value)),
                Some(_) => {}
                None => secrets.extend(secrets_in_key(pair)),
            }
        }
    }
    // The widest reading: up to the last '@' of all, when what comes before the first ':' is a
    // user name ("weird:SEKa?SEKb=SEKc/@host": libpq finds no '@' before the '/', and bank's
    // readings above ended the password at the '?'). A URL that holds it is refused anyway,
    // and hiding more than the password is the lesser harm.
    // Only when a '?' or '#' ends bank's reading of that password: one that ends at an '@'
    // was read whole above, and from there to the last '@' of an '@' in a parameter's value
    // ("bank:pw@h/bank?application_name=deploy@ci") is host, port, database and query, which
    // every message's URL lost ("cannot connect to postgres://bank:***@ci").
    if let Some((user, password)) = rest.rsplit_once('@').and_then(|(u, _)| u.split_once(':')) {
        let ended_by = password
            .find(['?', '#', '/', '@'])
            .map(|at| &password[at..at + 1]);
        if !user.contains(['/', '?', '#', '@']) && matches!(ended_by, Some("?" | "#")) {
            secrets.push(password.to_string());
        }
    }
    secrets.extend(keyword_passwords(raw));
    // libpq decodes %XX (and only that: a '+' stays a '+'); a message could carry either form.
    let decoded: Vec<String> = secrets.iter().map(|s| percent_decoded(s)).collect();
    secrets.extend(decoded);
    secrets.retain(|s| !s.is_empty());
    // Longest first, so a secret that contains another is replaced whole.
    secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    secrets.dedup();
    secrets
}

/// libpq's connection parameters (PostgreSQL 18's, and older ones still taken).
const LIBPQ_KEYWORDS: [&str; 52] = [
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslkeylogfile",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
    "require_auth",
    "min_protocol_version",
    "max_protocol_version",
    "scram_client_key",
    "scram_server_key",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
    "authtype",
    "tty",
];

/// The parameters that follow a password parameter and are no parameter of libpq's (no '=', or
/// a key it does not know): the rest of a password holding '&', which libpq refuses, quoting it.
fn password_pieces(query: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut in_password = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map(|(k, _)| percent_decoded(k));
        match key {
            // libpq also takes `ssl` (JDBC's `ssl=true`, which it reads as `sslmode=require`).
            Some(k) if LIBPQ_KEYWORDS.contains(&k.as_str()) || k == "ssl" => {
                in_password = is_password_key(&k)
            }
            _ if in_password => pieces.push(pair),
            _ => {}
        }
    }
    pieces
}

/// Whether `url` (as written, or redacted) sets the connection parameter `name` in its query:
/// bank's own parameters are appended only where it does not (`connect_string`), and a value
/// libpq refuses is the URL's own only where it does (`ConnectError`); the others come from
/// libpq's environment variables or a service file. libpq decodes a key's `%XX` as it does a
/// value's: `ssl%6Dode=bogus` is its `sslmode`, and `connect%5Ftimeout=5` its connect timeout
/// (which bank's own then overrode).
pub(crate) fn query_sets(url: &str, name: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|pair| key_is(pair.split('=').next().unwrap_or_default(), name))
    })
}

/// Whether a query's key, as written, is the connection parameter `name` (see `query_sets`).
pub(crate) fn key_is(key: &str, name: &str) -> bool {
    percent_decoded(key).eq_ignore_ascii_case(name)
}

/// `s` with each `%XX` decoded, as libpq decodes every part of a URL, keys included (a '+'
/// stays a '+', unlike form data). A '%' without two hex digits is kept: libpq refuses it, and
/// its refusal quotes the text as written.
fn percent_decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The secret values of libpq's keyword/value form (`host=h password=x`), which is no URL and is
/// refused, but is shown in the refusal; each as written and as libpq reads it.
fn keyword_passwords(raw: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(eq) = raw[from..].find('=').map(|i| i + from) {
        from = eq + 1;
        // libpq allows blanks around the '=': `password = 'x'`.
        let before = raw[..eq].trim_end_matches(is_conninfo_space);
        let keyword_start = before
            .rfind(|c: char| is_conninfo_space(c) || c == '=')
            .map_or(0, |i| i + 1);
        let keyword = &before[keyword_start..];
        // A URL's parameter (`?password=a&b`) is the URL's to read: libpq ends its value at the
        // '&', where the keyword/value form would not.
        if !is_password_key(keyword) || keyword.contains(['?', '&']) || keyword.contains("://") {
            continue;
        }
        let after = raw[from..].trim_start_matches(is_conninfo_space);
        let value_start = raw.len() - after.len();
        let (written, read, len) = conninfo_value(after);
        found.push(written.to_string());
        found.push(read);
        from = value_start + len;
    }
    found
}

/// The value at the start of `s` as libpq's keyword/value parser reads it: in single quotes up to
/// the closing one, else up to a blank; a backslash takes the next character as it is, in both.
/// Returns the value as written (without its quotes), as libpq reads it, and the length taken.
fn conninfo_value(s: &str) -> (&str, String, usize) {
    let quoted = s.starts_with('\'');
    let body = &s[usize::from(quoted)..];
    let mut read = String::new();
    let mut end = None;
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => read.extend(chars.next().map(|(_, next)| next)),
            '\'' if quoted => {
                end = Some((i, 1));
                break;
            }
            c if !quoted && is_conninfo_space(c) => {
                end = Some((i, 0));
                break;
            }
            c => read.push(c),
        }
    }
    // No closing quote: libpq refuses the string, and the rest of it is the value.
    let (end, closing) = end.unwrap_or((body.len(), 0));
    (&body[..end], read, usize::from(quoted) + end + closing)
}

/// A blank to libpq's keyword/value parser (C's `isspace`): anything else, a non-ASCII space
/// included, is part of a value.
fn is_conninfo_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// A parameter that holds a secret: libpq's `password` and `sslpassword` (the client key's
/// passphrase), and `oauth_client_secret` (libpq 18). In any case (libpq refuses `PASSWORD`, and
/// its refusal quotes it) and percent-decoded (libpq decodes a URL's keys: `pass%77ord`).
fn is_password_key(key: &str) -> bool {
    let key = percent_decoded(key).to_ascii_lowercase();
    // "pass" and "pwd" too: a misspelt `passwd=` is refused by libpq, which quotes its value.
    // `passfile` names a file, no secret.
    (key.contains("pass") && key != "passfile") || key.contains("pwd") || key.ends_with("secret")
}

/// A `user=` parameter (libpq's keyword).
fn is_user_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("user")
}

/// A user name with a password typed after it (`?user=weird:S3cr3t`, `weird%3AS3cr3t@`, the
/// colon written or percent-encoded, which libpq decodes into the user name it sends and its
/// messages show): the name with its colon, and the password as written.
fn split_user(user: &str) -> Option<(&str, &str)> {
    let colon = user.find(':').map(|at| at + 1);
    let encoded = user.to_ascii_lowercase().find("%3a").map(|at| at + 3);
    let end = match (colon, encoded) {
        (Some(c), Some(e)) => c.min(e),
        (c, e) => c.or(e)?,
    };
    Some(user.split_at(end))
}

/// The password typed in a user name (`split_user`), as written and decoded.
fn secrets_in_user(user: &str) -> Vec<String> {
    split_user(user).map_or_else(Vec::new, |(_, tail)| {
        vec![tail.to_string(), percent_decoded(tail)]
    })
}

/// What follows the word `password` in a parameter with no '=' (`?passwordSEKRET`,
/// `?PASSWORD:SEKRET`): the '=' left out, that is the password, and libpq's refusal quotes the
/// key whole, as written. Percent-decoded, and as written: the whole key when the word itself
/// is encoded (`pass%77ordSEKRET`).
fn secrets_in_key(key: &str) -> Vec<String> {
    let tail = |key: &str| {
        // ASCII lower-casing keeps every byte where it was.
        let at = key.to_ascii_lowercase().find("password")? + "password".len();
        Some(key[at..].trim().to_string()).filter(|t| !t.is_empty())
    };
    let Some(decoded) = tail(&percent_decoded(key)) else {
        return Vec::new();
    };
    vec![decoded, tail(key).unwrap_or_else(|| key.to_string())]
}

/// A key up to the end of the word `password` in it; empty when the word is percent-encoded.
fn password_prefix(key: &str) -> &str {
    key.to_ascii_lowercase()
        .find("password")
        .map_or("", |at| &key[..at + "password".len()])
}

/// Any text that may quote a URL or a keyword/value string the user typed (clap's "unexpected
/// argument 'postgres://…'"), with the passwords in it hidden.
pub fn redact_message(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let keywords = lower.contains("password") || lower.contains("secret");
    if !text.contains("://") && !keywords {
        return text.to_string();
    }
    // A URL followed by ": " and an error: the colon may be the message's, and the password
    // alone may be quoted again after it, so both readings count.
    let mut secrets: Vec<String> = quoted_urls(text)
        .into_iter()
        .flat_map(|url| [Some(url), url.strip_suffix(':')])
        .flatten()
        .flat_map(secrets_of)
        .collect();
    if keywords {
        secrets.extend(keyword_passwords(text));
    }
    // A URL already shown redacted and followed by ": " and an error reads as the secret
    // "***:", and hiding it took the colon with it. Nothing is cut from a secret itself: a
    // password that ends in ':' is hidden whole (cutting the colon showed it).
    secrets.retain(|s| !s.is_empty() && s.trim_end_matches(':') != "***");
    secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    secrets.dedup();
    redact(text, &secrets)
}

/// The URLs `text` quotes, each from its scheme to its end.
///
/// A URL is read one word at a time: read from the whole text, a later '@' (a user "rv@x" in the
/// server's own words) made everything up to it a password, and the message was lost. But a
/// password may hold blanks, so a URL goes on past its word when what it is has not ended:
/// quoted (clap quotes what it did not expect), up to its closing quote; and while its userinfo
/// has had no '@', up to the next word with one.
fn quoted_urls(text: &str) -> Vec<&str> {
    const QUOTES: [char; 3] = ['\'', '"', '`'];
    let words: Vec<(usize, &str)> = text
        .split_whitespace()
        .map(|w| (w.as_ptr() as usize - text.as_ptr() as usize, w))
        .collect();
    let mut urls = Vec::new();
    for (i, &(at, word)) in words.iter().enumerate() {
        let Some(scheme_end) = word.find("://").map(|s| s + 3) else {
            continue;
        };
        let quote = word.chars().next().filter(|c| QUOTES.contains(c));
        let start = at + word.len() - word.trim_start_matches(QUOTES).len();
        let after_scheme = at + scheme_end;
        // Quoted: the quote that ends the argument is one followed by a blank, punctuation or
        // nothing ("pa'ss" is inside it).
        let closing = quote.and_then(|q| {
            text[after_scheme..]
                .match_indices(q)
                .map(|(j, _)| after_scheme + j)
                .find(|&j| {
                    text[j + 1..]
                        .chars()
                        .next()
                        .is_none_or(|c| c.is_whitespace() || ",.;:)".contains(c))
                })
        });
        let mut end = closing.unwrap_or(at + word.len());
        let authority = &text[after_scheme..end];
        let open = !authority.contains(['@', '/', '?']);
        // "postgres://db:5432: FATAL…": a whole URL, then the message; that port is no password.
        let whole = open && ends_a_url(authority);
        if open && !whole {
            let next_at = words[i + 1..]
                .iter()
                .take_while(|(_, w)| !w.contains("://"))
                .find(|(_, w)| w.contains('@'));
            if let Some(&(w_at, w)) = next_at {
                let w = w.trim_end_matches([',', '.', ';', ':', ')']);
                // Quoted, the word must end the argument: else the '@' is the message's.
                if quote.is_none_or(|q| w.ends_with(q)) {
                    end = w_at + w.len();
                }
            }
        }
        let url = text[start..end].trim_end_matches(['\'', '"', '`', '(', ')', ',']);
        urls.push(match whole {
            true => url.strip_suffix(':').unwrap_or(url),
            false => url,
        });
    }
    urls
}

/// Whether an authority with no '@' that ends in ':' is a whole one, followed by a message
/// ("postgres://db:5432: FATAL…"): hosts whose ports, if any, are numbers. Not so
/// "postgres://u:pass word@h", a password's first word where a port goes.
fn ends_a_url(authority: &str) -> bool {
    authority
        .strip_suffix(':')
        .is_some_and(|hosts| hosts.split(',').all(|h| check_port(h).is_ok()))
}

fn redact(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_string(), |t, secret| {
        if secret.chars().count() >= SHORT {
            return t.replace(secret.as_str(), "***");
        }
        // A password of a character or three is hidden where it stands alone: everywhere, it
        // took every "0" out of "127.0.0.1" and the port, and the message said nothing.
        let part_of_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '.');
        let mut out = String::with_capacity(t.len());
        let mut rest = t.as_str();
        while let Some(at) = rest.find(secret.as_str()) {
            let before = rest[..at].chars().last().or_else(|| out.chars().last());
            let after = rest[at + secret.len()..].chars().next();
            out.push_str(&rest[..at]);
            match part_of_word(before) || part_of_word(after) {
                true => out.push_str(secret),
                false => out.push_str("***"),
            }
            rest = &rest[at + secret.len()..];
        }
        out.push_str(rest);
        out
    })
}

/// Secrets shorter than this are hidden only where they stand alone (see `redact`).
const SHORT: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(raw: &str) -> String {
        match DbUrl::parse(raw) {
            Ok(url) => url.to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_empty_url_is_named_as_such() {
        // "malformed database URL : it must…", with nothing where the URL goes.
        assert_eq!(
            shown(""),
            "malformed database URL (empty): it must start with postgres:// or postgresql://"
        );
    }

    #[test]
    fn passwords_are_hidden_wherever_the_url_carries_them() {
        assert_eq!(
            shown("postgres://bank:s3cret@db:5432/bank"),
            "postgres://bank:***@db:5432/bank"
        );
        assert_eq!(
            shown("postgresql://bank@db/bank?sslmode=require&password=s3cret"),
            "postgresql://bank@db/bank?sslmode=require&password=***"
        );
        for raw in [
            "postgres://bank:s3/cr?et@db/bank",
            "postgres://bank:s3cr@t@db/bank",
            "postgres://bank:s3cret@db:port/bank",
            "mysql://bank:s3cret@db/bank",
        ] {
            let text = shown(raw);
            assert!(!text.contains("s3"), "{raw} -> {text}");
        }
    }

    /// Two typos that put a password where bank did not look (found by a helper playing a new
    /// user): a parameter misspelt (`passwd=`, which libpq refuses, quoting it) and the colon
    /// percent-encoded, which libpq decodes into the user name it sends and shows.
    #[test]
    fn passwords_in_misspelt_places_are_hidden_too() {
        for raw in [
            "postgres://u:x@db/bank?passwd=S3cr3t",
            "postgres://u@db/bank?pwd=S3cr3t",
            "postgres://weird%3AS3cr3t@db/bank",
            "postgres://weird%3aS3cr3t@db/bank",
            // With a password too (found by a new user): the server's refusal names the user.
            "postgres://weird%3AS3cr3t:pw@db/bank",
            "postgresql:///bank?host=db&user=weird%3AS3cr3t",
            "postgresql:///bank?host=db&user=weird:S3cr3t",
        ] {
            let text = shown(raw);
            assert!(!text.contains("S3cr3t"), "{raw} -> {text}");
            let url = DbUrl::parse(raw).expect("valid");
            let said = url.redact_text("user \"weird:S3cr3t\": invalid \"S3cr3t\"");
            assert!(!said.contains("S3cr3t"), "{raw} -> {said}");
        }
        assert_eq!(
            shown("postgres://weird%3AS3cr3t@db/bank"),
            "postgres://weird%3A***@db/bank"
        );
    }

    #[test]
    fn a_unix_socket_in_the_host_parameter_is_a_url() {
        for raw in [
            "postgresql://bank@/t1?host=/tmp/bank-pg&port=54342",
            "postgresql://bank:pw@/t1?host=/tmp/bank-pg",
            "postgresql:///t1?host=/tmp/bank-pg",
        ] {
            let url = DbUrl::parse(raw);
            assert!(url.is_ok(), "{raw}: {:?}", url.err().map(|e| e.to_string()));
        }
        assert_eq!(
            shown("postgresql://bank:pw@/t1?host=/tmp/bank-pg"),
            "postgresql://bank:***@/t1?host=/tmp/bank-pg"
        );
        assert_eq!(
            shown("postgresql://bank:pw@:54339/t1?host=/tmp/bank-pg"),
            "postgresql://bank:***@:54339/t1?host=/tmp/bank-pg"
        );
        assert!(DbUrl::parse("postgresql://bank@:54339x/t1").is_err());
        // Without any host, libpq's defaults decide (PGHOST, a service file, the socket).
        assert!(DbUrl::parse("postgresql://bank@/t1").is_ok());
        assert!(DbUrl::parse("postgresql://?service=bank").is_ok());
    }

    #[test]
    fn a_message_quoting_an_at_sign_after_a_url_keeps_its_words() {
        let line = "cannot connect to postgres://rv%40x:***@127.0.0.1:54344/bank: connection to \
                    server failed: FATAL: password authentication failed for user \"rv@x\"";
        assert_eq!(redact_message(line), line);
        let typed = "no command postgres://bank:Sekr3t@h/db: `bank --help` lists them";
        assert_eq!(
            redact_message(typed),
            "no command postgres://bank:***@h/db: `bank --help` lists them"
        );
        assert!(!redact_message("host=h password=Sekr3t dbname=x").contains("Sekr3t"));
        assert!(!redact_message("unexpected argument 'postgres://u:pa'ss@h/db'").contains("pa'ss"));
    }

    #[test]
    fn a_url_taken_as_text_shows_control_characters_escaped() {
        let url = DbUrl::parse("postgresql://bank@/r1?host=/x\u{1b}[31mRED").expect("url");
        assert!(!url.to_string().contains('\u{1b}'), "{url}");
        assert!(url.to_string().contains("\\u{1b}"), "{url}");
    }

    #[test]
    fn a_port_outside_1_to_65535_is_refused_wherever_it_is_written() {
        // Port 0 and a `port=` parameter reached libpq, which refused them after bank had
        // connected nothing: exit 1, not 2, and the message said 0 was allowed.
        for raw in [
            "postgres://bank@db:0/bank",
            "postgres://bank@db:99999/bank",
            "postgres://bank@db/bank?port=99999",
            "postgres://bank@db/bank?port=0",
            "postgres://bank@db1:5432,db2:0/bank",
            "postgres://bank@/bank?host=/tmp&port=x",
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("from 1 to 65535")),
                "{raw}: {e:?}"
            );
        }
        assert!(DbUrl::parse("postgres://bank@db/bank?port=5433").is_ok());
        assert!(DbUrl::parse("postgres://bank@db1,db2/bank?port=,5433").is_ok());
        assert!(DbUrl::parse("postgres://[::1]/bank?port=5433&application_name=a@b").is_ok());
    }

    #[test]
    fn a_password_without_its_at_host_is_not_shown_as_a_port() {
        // "bank:Sekr3t/bank" (the '@host' forgotten, or the '@' encoded, or a .env line cut at
        // " #"): the password sat where a port goes, and the message about the port showed it.
        for (raw, secret) in [
            ("postgres://bank:Sekr3t/bank", "Sekr3t"),
            ("postgres://bank:Sekr3t%40127.0.0.1/bank", "Sekr3t"),
            ("postgres://bank:Sekr3t,h2/bank", "Sekr3t"),
            ("postgres://sp:Se", "Se"),
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            let e = e.unwrap_or_default();
            assert!(e.contains("malformed"), "{raw}: {e}");
            assert!(!e.contains(secret), "{raw}: {e}");
        }
        // The host stays visible; a port out of range is hidden too (digits can be a password).
        let e = DbUrl::parse("postgres://db:99999/bank")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("postgres://db:***/bank")));
    }

    #[test]
    fn an_unencoded_slash_in_the_password_is_named() {
        // "bank:pa/ss@host": the authority ends at the '/', so "ss@host:54342" became the path
        // and "pa" the port, and the message blamed a port that looked fine.
        for raw in [
            "postgres://bank:pa/ss@127.0.0.1:54342/r1",
            "postgres://bank:pa?ss@127.0.0.1:54342/r1",
            "postgres://bank:pa#ss@127.0.0.1:54342/r1",
            // Several hosts: libpq read "bank:SEKa" as host and port, and its message quoted
            // "SEKa" (a reviewer).
            "postgres://bank:pa/ss@127.0.0.1:1,127.0.0.1:2/bank",
            // A piece that reads as a port: libpq would connect to host "bank", port 12.
            "postgres://bank:12/ss@127.0.0.1:54342/r1",
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("percent-encoded")),
                "{raw}: {e:?}"
            );
            assert!(!e.unwrap_or_default().contains("ss@"), "{raw}");
        }
    }

    #[test]
    fn a_short_password_is_hidden_where_it_stands_alone_only() {
        // "0" was hidden inside every host and port: "127.***.***.1" (a reviewer).
        let url = DbUrl::parse("postgres://bank:0@127.0.0.1:5430/bank").expect("valid");
        assert_eq!(
            url.redact_text("at \"127.0.0.1\", port 5430 failed: \"0\" refused, 0 left"),
            "at \"127.0.0.1\", port 5430 failed: \"***\" refused, *** left"
        );
        let url = DbUrl::parse("postgres://bank:Sekr3t@db/bank").expect("valid");
        assert_eq!(url.redact_text("xSekr3tx"), "x***x");
    }

    #[test]
    fn an_at_sign_in_a_parameter_is_no_password() {
        for raw in [
            "postgres://db/bank?user=a@b",
            "postgres://u:p@db:5432/bank?options=x@y",
        ] {
            assert!(DbUrl::parse(raw).is_ok(), "{raw}");
        }
        // With no '/' before it, libpq takes the '@' for the userinfo's end: it reads
        // "postgres://db?user=a@b" as the user "db?user=a" on host "b" (psql does so), so it is
        // refused, not handed to libpq.
        assert!(DbUrl::parse("postgres://db?user=a@b").is_err());
        // Shown whole: the password alone is hidden, not all up to the parameter's '@'.
        for raw in [
            "postgres://bank:SEKRET9@h:1/bank?application_name=deploy@ci",
            "postgres://bank:***@h:1/bank?application_name=deploy@ci",
        ] {
            let said = redact_message(&format!("cannot connect to {raw}: refused"));
            assert!(
                said.contains("@h:1/bank?application_name=deploy@ci"),
                "{said}"
            );
            assert!(!said.contains("SEKRET9"), "{said}");
        }
    }

    /// An unencoded '&' in a password parameter (a helper playing a new user): libpq refused
    /// the piece after it as a parameter without '=', quoting it, and bank showed it, in its
    /// message and in the URL ("?password=***&SEKb=").
    #[test]
    fn an_ampersand_in_a_password_parameter_is_refused_and_hidden() {
        // libpq's `ssl=true` (JDBC's, read as sslmode=require) is a parameter, not a piece.
        for raw in [
            "postgres://u@h/bank?password=pw&ssl=true",
            "postgres://u@h/bank?ssl=true&password=pw",
        ] {
            assert!(DbUrl::parse(raw).is_ok(), "{raw}");
        }
        // Each with the piece libpq quotes.
        for (raw, secret) in [
            (
                "postgres://weird@127.0.0.1:1/bank?password=SEKa&SEKb*",
                "SEKb*",
            ),
            (
                "postgres://weird@h/bank?password=SEKa&SEKb[SEKc\\",
                "SEKb[SEKc\\",
            ),
            (
                "postgres://weird@h1,h2/bank?password=SEKa&SEKb&SEKc",
                "SEKb",
            ),
            ("postgres://weird@/bank?host=/x&password=SEKa&SEKb", "SEKb"),
            // libpq: 'invalid URI query parameter: "SEKb"'.
            ("postgres://weird@h/bank?password=SEKa&SEKb=SEKc]", "SEKb"),
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("%26")),
                "{raw}: {e:?}"
            );
            let e = e.unwrap_or_default();
            assert!(!e.contains("SEK"), "{raw}: {e}");
            let said = redact_message(&format!(
                "cannot connect to {raw}: missing key/value separator \"=\" in URI query \
                 parameter: \"{secret}\""
            ));
            assert!(!said.contains(secret), "{raw}: {said}");
        }
    }

    /// An unencoded '?' in a password (a helper playing a new user): libpq reads
    /// "weird:5?a=b@host" as the password "5?a=b", bank read a port "5" and a query, accepted
    /// the URL and showed the password whole in every message ("cannot connect to
    /// postgres://weird:5?a=b@127.0.0.1:54531/bank: … database "bank&connect_timeout=5…"").
    #[test]
    fn a_question_mark_in_the_password_is_refused_and_hidden() {
        for (raw, secret) in [
            ("postgres://weird:5?a=b@127.0.0.1:54531/bank", "5?a=b"),
            (
                "postgres://weird:T72e85?T90575+Tc0731;T458e2=@127.0.0.1:1/bank",
                "T72e85",
            ),
            ("postgres://weird:Te0a1d?T19909=Tc25a9@h/bank", "Te0a1d"),
            ("postgres://weird:Se#cret=x@h:5432/bank", "Se#cret"),
            ("postgres://weird:Sec?ret@h1:1,h2:2/bank", "Sec?ret"),
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("percent-encoded")),
                "{raw}: {e:?}"
            );
            let e = e.unwrap_or_default();
            assert!(!e.contains(secret), "{raw}: {e}");
            let said = redact_message(&format!("cannot connect to {raw}: refused"));
            assert!(!said.contains(secret), "{raw}: {said}");
        }
        // No '@' before the '/' for libpq, the password ended at the '?' for bank: refused
        // (as a bad port), the password hidden whole.
        for raw in [
            "postgresql://weird:SEKa?SEKb'SEKc=SEKd/@/bank?host=/x",
            "postgres://weird:SEKa?SEKb#SEKc/SEKd=@127.0.0.1:1/bank",
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| !e.contains("SEK")),
                "{raw}: {e:?}"
            );
        }
    }

    #[test]
    fn what_libpq_reads_as_a_port_is_hidden_from_its_messages() {
        // Refused before libpq sees it, but a message quoting such a URL, or libpq's own words
        // about the piece it took for a port, must not show it.
        let text = redact_message(
            "cannot connect to postgres://bank:SEKa/SEKb@127.0.0.1:1,127.0.0.1:2/bank: \
             invalid integer value \"SEKa\" for connection option \"port\"",
        );
        assert!(!text.contains("SEK"), "{text}");
    }

    /// A link-local address with its zone: refused as "invalid IPv6 address" (the url crate's
    /// word), though libpq and psql take it (found by a reviewer).
    #[test]
    fn an_ipv6_host_with_its_zone_is_libpq_s_to_read() {
        let url = DbUrl::parse("postgres://u:SEKRIT@[fe80::1%25eth0]:5432/d").expect("a URL");
        assert_eq!(url.to_string(), "postgres://u:***@[fe80::1%25eth0]:5432/d");
        assert!(DbUrl::parse("postgres://u@[fe80::1%25eth0]:x/d").is_err());
    }

    #[test]
    fn an_ipv6_host_without_its_closing_bracket_is_refused() {
        for raw in [
            "postgres://bank@127.0.0.1:5432,[::1/bank",
            "postgres://bank@[::1/bank",
            "postgres://bank@[::1:5432",
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("malformed")),
                "{raw}: {e:?}"
            );
        }
        assert!(DbUrl::parse("postgres://bank@127.0.0.1:5432,[::1]:5433/bank").is_ok());
    }

    #[test]
    fn an_unencoded_at_sign_in_the_password_is_refused_whole() {
        let text = shown("postgres://bank:Sek@ret16@127.0.0.1:5432/bank");
        assert!(text.contains("%40"), "{text}");
        assert!(!text.contains("Sek") && !text.contains("ret16"), "{text}");
        assert_eq!(
            shown("postgres://bank:Sek%40ret16@127.0.0.1:5432/bank"),
            "postgres://bank:***@127.0.0.1:5432/bank"
        );
    }

    #[test]
    fn a_keyword_value_string_is_refused_without_its_password() {
        for raw in [
            "host=db user=bank password=s3cret dbname=bank",
            "host=db password = 's3 cret' dbname=bank",
            "host=db PASSWORD=s3cret",
        ] {
            let text = shown(raw);
            assert!(text.contains("must start with postgres://"), "{text}");
            assert!(!text.contains("s3"), "{raw} -> {text}");
        }
    }

    #[test]
    fn only_the_password_is_hidden() {
        assert_eq!(
            shown("postgres://bank:bank@127.0.0.1:54329/bank"),
            "postgres://bank:***@127.0.0.1:54329/bank"
        );
        assert_eq!(
            shown("postgresql://root:pw@h1:26257,h2:26257/defaultdb?sslmode=disable&password=pw"),
            "postgresql://root:***@h1:26257,h2:26257/defaultdb?sslmode=disable&password=***"
        );
        assert_eq!(
            shown("postgres://bank:p%40ss@db/bank"),
            "postgres://bank:***@db/bank"
        );
    }

    #[test]
    fn multi_host_urls_are_accepted_and_checked() {
        assert!(DbUrl::parse("postgresql://u@h1:26257,h2:26257/db").is_ok());
        assert!(DbUrl::parse("postgresql://u@h1:26257,h2:port/db").is_err());
        let url = DbUrl::parse("postgresql://u:pw@h1:1,h2:2/db?x=1").expect("valid");
        assert_eq!(
            url.with_database("other").expose(),
            "postgresql://u:pw@h1:1,h2:2/other?x=1"
        );
        assert_eq!(url.host_port(), None);
    }

    #[test]
    fn libpq_messages_are_redacted_too() {
        let url = DbUrl::parse("postgres://bank:s3cret@db/bank").expect("valid");
        assert_eq!(url.redact_text("failed for s3cret"), "failed for ***");
    }

    #[test]
    fn a_proxy_can_stand_in_for_the_server() {
        let url = DbUrl::parse("postgres://bank:pw@127.0.0.1:54329/bank").expect("valid");
        assert_eq!(url.host_port(), Some(("127.0.0.1".into(), 54329)));
        let via = url
            .via("127.0.0.1", 7000, &[("sslmode", "disable")])
            .expect("one host");
        assert_eq!(
            via.expose(),
            "postgres://bank:pw@127.0.0.1:7000/bank?sslmode=disable"
        );
    }

    #[test]
    fn another_database_keeps_the_rest() {
        let url = DbUrl::parse("postgres://bank:pw@db:5432/bank?sslmode=disable").expect("valid");
        assert_eq!(
            url.with_database("other").expose(),
            "postgres://bank:pw@db:5432/other?sslmode=disable"
        );
    }

    /// A URL shown redacted and followed by ": " and the error (`cannot connect to URL: ...`)
    /// with `password=` as its last parameter: the colon was taken for part of the secret and
    /// hidden with it (found by two reviewers). And a password that ends in ':' is hidden
    /// whole: cutting that colon, as a first fix did, printed it (`password=:` whole, `sec:`
    /// as `***:`; found by a reviewer).
    #[test]
    fn the_colon_after_a_url_stays_and_a_password_s_own_colon_is_hidden() {
        let line = "cannot connect to postgres://bank@db/bank?password=***: refused";
        assert_eq!(redact_message(line), line);
        let raw = redact_message("cannot connect to postgres://bank@db/bank?password=wrong: no");
        assert!(!raw.contains("wrong"), "{raw}");
        let ends = redact_message("postgres://bank:a:b@db/bank?password=x:y");
        assert!(!ends.contains("x:y") && !ends.contains("a:b"), "{ends}");
        for (text, secret) in [
            ("host=db password=sec: dbname=bank", "sec:"),
            ("host=db password=: dbname=bank", "password=:"),
            ("postgres://u@db/bank?password=sec:", "sec:"),
            ("postgres://u:sec:@db/bank", "sec:"),
        ] {
            let shown = redact_message(text);
            assert!(!shown.contains(secret), "{text} -> {shown}");
        }
    }

    /// libpq percent-decodes a query's keys as well as its values, so `pass%77ord=` is its
    /// `password=`: a multi-host or socket URL (redacted as text) showed the value whole, and so
    /// did libpq's refusal of `PASS%57ORD=` (a reviewer).
    #[test]
    fn a_percent_encoded_password_key_is_a_password_key() {
        for (raw, secret) in [
            (
                "postgres://u@127.0.0.1:1,127.0.0.1:2/db?pass%77ord=SECRET1",
                "SECRET1",
            ),
            ("postgres://u@/db?host=/x&pass%77ord=SECRET5", "SECRET5"),
            ("postgres://u@h1,h2/db?PASS%57ORD=SECRETKEY", "SECRETKEY"),
            ("postgres://u@h1,h2/db?ssl%70assword=SECRETSSL", "SECRETSSL"),
            (
                "postgres://u@h1,h2/db?%70%61%73%73%77%6F%72%64=SECRETALL",
                "SECRETALL",
            ),
            ("postgres://u@h/db?pass%77ord=SECRET2", "SECRET2"),
        ] {
            let text = shown(raw);
            assert!(!text.contains(secret), "{raw} -> {text}");
            assert!(text.contains("=***"), "{raw} -> {text}");
            let line = redact_message(&format!("cannot connect to {raw}: {secret} refused"));
            assert!(!line.contains(secret), "{raw} -> {line}");
            let url = DbUrl::parse(raw).expect("valid");
            assert_eq!(
                url.redact_text(&format!("\"{secret}\"")),
                "\"***\"",
                "{raw}"
            );
        }
        // Not a secret: the file of passwords is a path, shown as written.
        assert_eq!(
            shown("postgres://u@h1,h2/db?passfile=/home/u/.pgpass"),
            "postgres://u@h1,h2/db?passfile=/home/u/.pgpass"
        );
    }

    /// clap quotes an argument it did not expect whole, spaces included; read one word at a
    /// time, `'postgres://u:topsecret with space@h/db'` showed `*** with space` (a reviewer).
    #[test]
    fn a_password_with_spaces_is_hidden_whole_in_a_message() {
        assert_eq!(
            redact_message("unrecognized subcommand 'postgres://u:topsecret with space@h/db'"),
            "unrecognized subcommand 'postgres://u:***@h/db'"
        );
        assert_eq!(
            redact_message("no command postgres://u:top secret@h/db: `bank --help` lists them"),
            "no command postgres://u:***@h/db: `bank --help` lists them"
        );
        for (text, secrets) in [
            (
                "unexpected argument 'postgres://u ser:topsecret@h/db' found",
                &["topsecret"][..],
            ),
            (
                "unexpected argument 'postgres://u:pa' ss@h/db' found",
                &["pa'", "ss@"],
            ),
            (
                "unexpected argument 'postgres://h/db?password=ab cdefgh' found",
                &["ab", "cdefgh"],
            ),
            (
                "unexpected argument 'postgres://u:a b c d@h1,h2/db' found",
                &["a b", "c d"],
            ),
        ] {
            let shown = redact_message(text);
            for secret in secrets {
                assert!(!shown.contains(secret), "{text} -> {shown}");
            }
        }
        // A URL without a password, then a user named with an '@' in the server's words.
        let line = "cannot connect to postgres://db:5432: FATAL: role \"rv@x\" does not exist";
        assert_eq!(redact_message(line), line);
    }

    /// libpq's keyword/value syntax: a quoted value ends at its closing quote, `\'` and `\\`
    /// inside it are escapes, an unquoted value ends at whitespace not escaped by `\`, and `&`
    /// separates nothing. Read otherwise, part of each password below was shown (a reviewer).
    #[test]
    fn keyword_values_are_read_as_libpq_reads_them() {
        for (text, pieces) in [
            (
                r"host=h password='SKa\'SKb SKc' dbname=x",
                &["SKa", "SKb", "SKc"][..],
            ),
            (r"host=h password=SKa\ SKb dbname=x", &["SKa", "SKb"]),
            ("host=h password=SKa&SKb dbname=x", &["SKa", "SKb"]),
            ("host=h password = 'SKa SKb' dbname=x", &["SKa", "SKb"]),
            ("host=h password= SKa dbname=x", &["SKa"]),
            (r"host=h password='SKa\\' dbname=x", &["SKa"]),
            ("host=h sslpassword='SKa SKb' dbname=x", &["SKa", "SKb"]),
            ("host=h oauth_client_secret=SKa dbname=x", &["SKa"]),
            ("host=h password='SKa SKb", &["SKa", "SKb"]),
        ] {
            for shown in [redact_message(text), shown(text)] {
                for piece in pieces {
                    assert!(!shown.contains(piece), "{text} -> {shown}");
                }
                // What follows the value is no secret.
                assert!(shown.contains("host=h"), "{text} -> {shown}");
            }
        }
        assert_eq!(
            redact_message(r"host=h password='ab\'cd efgh' dbname=x"),
            "host=h password='***' dbname=x"
        );
        assert_eq!(
            redact_message(r"host=h password=ab\ cdefgh dbname=x"),
            "host=h password=*** dbname=x"
        );
        // The value libpq reads, unescaped, is hidden where a message quotes it.
        assert_eq!(
            redact_message(r"password='ab\'cd efgh': authentication with ab'cd efgh failed"),
            "password='***': authentication with *** failed"
        );
        // A URL's query is split at '&' by libpq: what follows is another parameter.
        assert_eq!(
            redact_message("postgres://u@h1,h2/db?password=abcd&sslmode=disable"),
            "postgres://u@h1,h2/db?password=***&sslmode=disable"
        );
    }

    /// A password given percent-encoded reaches libpq decoded: a message may quote either form.
    #[test]
    fn a_percent_encoded_password_is_hidden_encoded_and_decoded() {
        for raw in [
            "postgres://bank:p%40ss%20w0rd@db/bank",
            "postgres://bank@db/bank?password=p%40ss%20w0rd",
            "postgres://bank@db1,db2/bank?pass%77ord=p%40ss%20w0rd",
            "postgres://bank:p%40ss%20w0rd@db1,db2/bank",
        ] {
            let url = DbUrl::parse(raw).expect("valid");
            assert_eq!(
                url.redact_text("p%40ss%20w0rd, p@ss w0rd"),
                "***, ***",
                "{raw}"
            );
            assert!(!url.to_string().contains("w0rd"), "{raw} -> {url}");
        }
        // No user, and several hosts: the password is still hidden.
        assert_eq!(shown("postgres://:pw12345@h/db"), "postgres://:***@h/db");
        assert_eq!(
            shown("postgres://:pw12345@h1:1,h2:2/db"),
            "postgres://:***@h1:1,h2:2/db"
        );
    }

    /// libpq has no fragments: a '#' in a query value is part of it, so a password with a '#'
    /// showed its rest (the url crate took it for the fragment and kept it).
    #[test]
    fn a_hash_in_a_password_parameter_is_part_of_it() {
        let text = shown("postgres://u@h/db?password=SEC#RET9");
        assert!(!text.contains("RET9"), "{text}");
        assert_eq!(text, "postgres://u@h/db?password=***");
        let line = redact_message("cannot connect to postgres://u@h/db?password=***: refused");
        assert!(line.contains("***: refused"), "{line}");
    }

    /// `?passwordSEKRET`, the '=' left out: libpq refuses the parameter and quotes its key,
    /// which holds the password; the URL showed it too (`passwordSEKRET=***`).
    #[test]
    fn a_password_parameter_without_its_equals_sign_is_hidden() {
        for (raw, key) in [
            ("postgres://u@h/db?passwordSEKRET", "passwordSEKRET"),
            ("postgres://u@h1,h2/db?passwordSEKRET", "passwordSEKRET"),
            (
                "postgres://u@h1,h2/db?sslmode=disable&PASSWORD:SEKRET",
                "PASSWORD:SEKRET",
            ),
            ("postgres://u@h/db?pass%77ordSEKRET", "passwordSEKRET"),
            // libpq quotes the key as written, not decoded.
            ("postgres://u@h/db?pass%77ordSEK%52ET", "pass%77ordSEK%52ET"),
        ] {
            let url = DbUrl::parse(raw).expect("valid");
            assert!(!url.to_string().contains("SEKRET"), "{raw} -> {url}");
            let refusal =
                format!("missing key/value separator \"=\" in URI query parameter: \"{key}\"");
            assert!(!url.redact_text(&refusal).contains("SEKRET"), "{raw}");
            let line = redact_message(&format!("cannot connect to {raw}: {refusal}"));
            assert!(!line.contains("SEKRET"), "{raw} -> {line}");
        }
        // The word alone is no secret: messages keep it.
        let url = DbUrl::parse("postgres://u@h/db?password").expect("valid");
        assert_eq!(
            url.redact_text("password authentication failed"),
            "password authentication failed"
        );
    }

    // Tests from a fourth mutation round (each fails on its mutant, passes here).

    /// A `user=name:secret` parameter of a URL with a host (the url crate's to show) hides the
    /// part after the colon, as the hostless form does: not hiding it passed every test.
    #[test]
    fn a_password_typed_in_a_user_parameter_is_hidden_in_a_url_with_a_host() {
        let raw = "postgres://db/bank?user=weird:S3cr3t";
        let text = shown(raw);
        assert!(!text.contains("S3cr3t"), "{text}");
        assert!(text.contains("user=weird"), "{text}");
    }

    /// Password pieces libpq would read as a query's keys (a '/' before the '@', so libpq finds
    /// no userinfo) are refused and not shown: accepted, the URL went to libpq, whose refusal of
    /// the key "SEKa" was shown with the URL whole. And a password with '/' then '?', no '=':
    /// its tail "ss?x" was shown.
    #[test]
    fn password_pieces_libpq_would_take_for_a_query_are_refused_unshown() {
        for (raw, pieces) in [
            (
                "postgres://weird:?SEKa=SEKb/SEKc@host/bank",
                &["SEKa", "SEKb", "SEKc"][..],
            ),
            ("postgres://bank:pa/ss?x@host/bank", &["ss?x"][..]),
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            let e = e.unwrap_or_else(|| panic!("{raw} accepted"));
            assert!(e.contains("percent-encoded"), "{raw}: {e}");
            for piece in pieces {
                assert!(!e.contains(piece), "{raw}: {e}");
            }
        }
    }

    /// A tab or a line end inside a URL is refused, as a space is: the url crate drops them
    /// silently, so bank would show one URL and libpq connect with another.
    #[test]
    fn a_tab_or_line_end_inside_a_url_is_refused() {
        for raw in [
            "postgres://bank:pw@db/ba\tnk",
            "postgres://bank:p\nw@db/bank",
        ] {
            let e = DbUrl::parse(raw).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("whitespace")),
                "{raw:?}: {e:?}"
            );
        }
    }

    /// A password key with its '=' left out and the rest percent-encoded
    /// (`pass%77ordSEK%52ET`): libpq's refusal quotes the key as written, whose encoded tail
    /// must be hidden too (only the decoded "SEKRET" was).
    #[test]
    fn a_password_key_without_its_equals_sign_is_hidden_as_written() {
        let url = DbUrl::parse("postgres://u@h/db?pass%77ordSEK%52ET").expect("valid");
        let said = url.redact_text("invalid URI query parameter: \"pass%77ordSEK%52ET\"");
        assert!(!said.contains("SEK%52ET"), "{said}");
        assert!(!said.contains("SEKRET"), "{said}");
    }

    /// A parameter the URL sets in another case or percent-encoded is still the URL's own:
    /// bank's own `connect_timeout` appended after `connect%5Ftimeout=60` overrode the user's.
    #[test]
    fn a_parameter_is_found_whatever_its_case_or_encoding() {
        assert!(query_sets(
            "postgres://h/db?connect%5Ftimeout=60",
            "connect_timeout"
        ));
        assert!(query_sets("postgres://h/db?SSLMODE=require", "sslmode"));
        assert!(!query_sets(
            "postgres://h/db?sslmode=require",
            "connect_timeout"
        ));
    }

    /// A password holding a blank whose first word ends in ':' is no whole URL followed by a
    /// message ("postgres://db:5432: FATAL"): "postgres://u:Sekr:" has no port, so the URL goes
    /// on to the word with the '@', and the password is hidden whole.
    #[test]
    fn a_password_word_ending_in_a_colon_is_not_taken_for_a_url_s_end() {
        let line = redact_message("bank: unexpected argument postgres://u:Sekr: et@h/db found");
        assert!(!line.contains("et@h"), "{line}");
        assert!(!line.contains("Sekr"), "{line}");
        assert!(line.contains("@h/db found"), "{line}");
    }
}
