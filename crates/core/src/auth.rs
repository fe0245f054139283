//! Users, passwords and permissions, as RabbitMQ models them.
//!
//! Passwords are kept only as RabbitMQ's salted SHA-256 hash
//! (`base64(salt ++ sha256(salt ++ password))`, 4-byte salt), so a definitions
//! export from RabbitMQ can be reused and no plain password stays in memory.
//! Permissions are three regular expressions per user and vhost over resource
//! names: `configure` (declare, delete), `write` (publish to an exchange, bind to a
//! queue) and `read` (consume from a queue, bind from an exchange).

use std::collections::HashMap;
use std::net::IpAddr;

use base64::Engine;
use regex::Regex;
use sha2::{Digest, Sha256};

use crate::error::{CoreError, CoreResult};

/// What a permission check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

/// The kind of resource a permission check names, for the error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Queue,
    Exchange,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Queue => "queue",
            Resource::Exchange => "exchange",
        }
    }
}

/// A user's stored credentials.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    /// `salt ++ sha256(salt ++ password)`, decoded from base64.
    hash: Vec<u8>,
    pub tags: Vec<String>,
    /// May log in only from a loopback address (RabbitMQ's rule for `guest`).
    pub loopback_only: bool,
}

/// A user's rights in one vhost.
#[derive(Debug, Clone)]
pub struct Permission {
    configure: Option<Regex>,
    write: Option<Regex>,
    read: Option<Regex>,
}

/// Why a login failed. The text is safe to log: it never holds the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("user '{0}' - invalid credentials")]
    BadCredentials(String),
    #[error("user '{0}' can only connect via localhost")]
    NotLoopback(String),
}

/// The broker's user database.
#[derive(Debug, Default)]
pub struct Auth {
    users: HashMap<String, User>,
    /// (user, vhost) -> permission
    permissions: HashMap<(String, String), Permission>,
}

/// RabbitMQ's password hash of `password` with `salt`, base64-encoded.
pub fn hash_password(password: &str, salt: [u8; 4]) -> String {
    let mut bytes = salt.to_vec();
    bytes.extend_from_slice(
        &Sha256::new()
            .chain_update(salt)
            .chain_update(password.as_bytes())
            .finalize(),
    );
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A new random 4-byte salt.
pub fn random_salt() -> [u8; 4] {
    rand::random()
}

/// Compiles a permission pattern; RabbitMQ anchors nothing, but an empty pattern
/// grants nothing at all.
fn compile_pattern(pattern: &str) -> Result<Option<Regex>, regex::Error> {
    if pattern.is_empty() {
        Ok(None)
    } else {
        Regex::new(pattern).map(Some)
    }
}

impl Auth {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a user from its base64 password hash.
    pub fn add_user(
        &mut self,
        name: &str,
        password_hash: &str,
        tags: Vec<String>,
        loopback_only: bool,
    ) -> Result<(), String> {
        let hash = base64::engine::general_purpose::STANDARD
            .decode(password_hash.trim())
            .map_err(|e| format!("password_hash of user '{name}' is not base64: {e}"))?;
        if hash.len() != 4 + 32 {
            return Err(format!(
                "password_hash of user '{name}' must be base64 of a 4-byte salt and a SHA-256 digest (36 bytes), got {} bytes",
                hash.len()
            ));
        }
        self.users.insert(
            name.to_owned(),
            User {
                name: name.to_owned(),
                hash,
                tags,
                loopback_only,
            },
        );
        Ok(())
    }

    /// Grants `user` the three patterns in `vhost`.
    pub fn set_permissions(
        &mut self,
        user: &str,
        vhost: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), String> {
        let compile = |what: &str, p: &str| {
            compile_pattern(p).map_err(|e| {
                format!(
                    "{what} pattern of user '{user}' in vhost '{vhost}' is not a valid regex: {e}"
                )
            })
        };
        let perm = Permission {
            configure: compile("configure", configure)?,
            write: compile("write", write)?,
            read: compile("read", read)?,
        };
        self.permissions
            .insert((user.to_owned(), vhost.to_owned()), perm);
        Ok(())
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    /// Checks a username and password, and where the client connects from.
    pub fn login(
        &self,
        username: &str,
        password: &[u8],
        peer: Option<IpAddr>,
    ) -> Result<&User, LoginError> {
        let bad = || LoginError::BadCredentials(username.to_owned());
        let user = self.users.get(username).ok_or_else(bad)?;
        let (salt, digest) = user.hash.split_at(4);
        let computed = Sha256::new()
            .chain_update(salt)
            .chain_update(password)
            .finalize();
        // Constant-time compare: the time taken must not tell how much matched.
        let diff = computed
            .iter()
            .zip(digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 || digest.len() != computed.len() {
            return Err(bad());
        }
        if user.loopback_only
            && !peer.is_some_and(|ip| ip.is_loopback() || ipv4_mapped_loopback(ip))
        {
            return Err(LoginError::NotLoopback(username.to_owned()));
        }
        Ok(user)
    }

    /// Whether `user` may use `vhost` at all.
    pub fn check_vhost(&self, user: &str, vhost: &str) -> CoreResult<()> {
        if self
            .permissions
            .contains_key(&(user.to_owned(), vhost.to_owned()))
        {
            Ok(())
        } else {
            Err(CoreError::not_allowed(format!(
                "access to vhost '{vhost}' refused for user '{user}'"
            )))
        }
    }

    /// Checks one permission; the error text is RabbitMQ's.
    pub fn check(
        &self,
        user: &str,
        vhost: &str,
        access: Access,
        resource: Resource,
        name: &str,
    ) -> CoreResult<()> {
        let perm = self.permissions.get(&(user.to_owned(), vhost.to_owned()));
        let pattern = perm.and_then(|p| match access {
            Access::Configure => p.configure.as_ref(),
            Access::Write => p.write.as_ref(),
            Access::Read => p.read.as_ref(),
        });
        if pattern.is_some_and(|re| re.is_match(name)) {
            Ok(())
        } else {
            // RabbitMQ's wording does not say which of the three was missing.
            Err(CoreError::access_refused(format!(
                "access to {} '{}' in vhost '{}' refused for user '{}'",
                resource.name(),
                name,
                vhost,
                user
            )))
        }
    }
}

fn ipv4_mapped_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        IpAddr::V4(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        let mut a = Auth::new();
        a.add_user("guest", &hash_password("guest", [1, 2, 3, 4]), vec![], true)
            .unwrap();
        a.add_user(
            "app",
            &hash_password("s3cret", random_salt()),
            vec![],
            false,
        )
        .unwrap();
        a.set_permissions("app", "/", "^app\\.", "^app\\.", ".*")
            .unwrap();
        a
    }

    #[test]
    fn rabbitmq_hash_of_guest_verifies() {
        // The hash shipped in config.toml, made the way RabbitMQ makes them.
        let mut a = Auth::new();
        a.add_user(
            "guest",
            "kI3GCrswBLNZQzHJJ95QLoyfAVooYhnvf7jbqiW9BjOYUloe",
            vec![],
            false,
        )
        .unwrap();
        assert!(a.login("guest", b"guest", None).is_ok());
        assert!(a.login("guest", b"guesT", None).is_err());
    }

    #[test]
    fn loopback_only_user_is_refused_from_elsewhere() {
        let a = auth();
        assert!(a
            .login("guest", b"guest", Some("127.0.0.1".parse().unwrap()))
            .is_ok());
        assert!(a
            .login("guest", b"guest", Some("::1".parse().unwrap()))
            .is_ok());
        assert_eq!(
            a.login("guest", b"guest", Some("10.0.0.7".parse().unwrap()))
                .err(),
            Some(LoginError::NotLoopback("guest".into()))
        );
        assert!(a
            .login("app", b"s3cret", Some("10.0.0.7".parse().unwrap()))
            .is_ok());
        assert!(a.login("nobody", b"x", None).is_err());
    }

    #[test]
    fn permissions_are_regexes_and_empty_grants_nothing() {
        let mut a = auth();
        assert!(a
            .check("app", "/", Access::Configure, Resource::Queue, "app.q")
            .is_ok());
        let err = a
            .check("app", "/", Access::Configure, Resource::Queue, "other")
            .unwrap_err();
        assert_eq!(
            err.text,
            "access to queue 'other' in vhost '/' refused for user 'app'"
        );
        a.set_permissions("app", "/", "", ".*", ".*").unwrap();
        assert!(a
            .check("app", "/", Access::Configure, Resource::Queue, "app.q")
            .is_err());
        assert!(a.check_vhost("app", "other").is_err());
    }
}
