//! Pluggable authentication: RabbitMQ's `auth_backends`, a chain of backends
//! asked in order. `internal` is the user database of [`crate::auth::Auth`];
//! others (the HTTP backend of crates/server) implement [`ExternalBackend`],
//! whose answer may take a network round trip.
//!
//! As in RabbitMQ (`rabbit_access_control:check_user_login`), the first backend
//! that allows the login decides; a refusal or an error passes the login to
//! the next backend, and the login fails when none allows it. Authorisation
//! (vhost, resource and topic permissions) is done by the backend that let the
//! user in, as in RabbitMQ: the internal database for its users; a token's
//! scopes for a user who logged in with an access token ([`Decision::AllowToken`],
//! [`crate::scopes`]); a backend's [`ExternalAuthz`] for the checks it decides
//! (the HTTP backend's vhost, resource and topic paths), the internal database
//! for the others. A name the internal database has is always authorised by it.
//!
//! Sessions are synchronous state machines, so a login that needs an external
//! backend is *pending*: [`crate::auth::Auth::begin_login`] spawns a task that
//! runs the rest of the chain and, once decided, fills a slot and calls the
//! session's wake function (its outbox's `wake`, so the connection driver calls
//! the session's outbox handler, which then takes the result). With only the
//! internal backend the answer is immediate and nothing is spawned.

use std::fmt::Debug;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::auth::{Access, LoginError, Resource, User};

/// A boxed future, as an [`ExternalBackend`] returns it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a backend is asked.
#[derive(Debug, Clone, Default)]
pub struct LoginRequest {
    pub username: String,
    pub password: Vec<u8>,
    pub peer: Option<IpAddr>,
    /// The vhost, when the protocol names it at login (MQTT, STOMP).
    pub vhost: Option<String>,
    /// MQTT's client id.
    pub client_id: Option<String>,
}

/// A backend's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Logged in, with these user tags.
    Allow { tags: Vec<String> },
    /// Logged in with an access token as `username` (from its claims, not
    /// the name the client sent), whose scopes are its permissions and tags.
    AllowToken {
        username: String,
        grants: crate::scopes::ScopeGrants,
    },
    /// Refused; the reason is for the log only.
    Deny(String),
}

/// A backend other than the internal database.
pub trait ExternalBackend: Send + Sync + Debug {
    /// Its name in `[auth] backends` (for the log).
    fn name(&self) -> &'static str;
    /// Decides a login; an error (unreachable, bad answer) is a `Deny` with the
    /// reason, so the next backend is asked.
    fn authenticate(&self, request: LoginRequest) -> BoxFuture<Decision>;
    /// What authorises the users this backend lets in (with [`Decision::Allow`]),
    /// if the backend does: None leaves it to the internal database.
    fn authz(&self) -> Option<Arc<dyn ExternalAuthz>> {
        None
    }
}

/// Who an [`ExternalAuthz`] is asked about: the user as its backend let it in.
#[derive(Debug, Clone, Default)]
pub struct AuthzUser {
    pub username: String,
    /// The tags the backend answered at login.
    pub tags: Vec<String>,
    /// Where the user's latest login came from.
    pub peer: Option<IpAddr>,
}

/// Authorisation by a backend other than the internal database (RabbitMQ's authz
/// half of a backend). Sessions check permissions synchronously, in the middle
/// of handling a frame, so an implementation that needs a network round trip
/// blocks the calling connection until it has the answer (a RabbitMQ channel
/// waits for its backend the same way) and caches answers; it is never called
/// with a lock held. Each check answers `None` when the backend does not decide
/// that kind of check (the internal database then does).
pub trait ExternalAuthz: Send + Sync + Debug {
    /// May `user` use `vhost` at all?
    fn vhost(&self, user: &AuthzUser, vhost: &str) -> Option<bool>;
    /// May `user` have `access` to the queue or exchange `name`?
    fn resource(
        &self,
        user: &AuthzUser,
        vhost: &str,
        resource: Resource,
        name: &str,
        access: Access,
    ) -> Option<bool>;
    /// Whether [`ExternalAuthz::topic`] decides topic authorisation.
    fn decides_topics(&self) -> bool;
    /// May `user` publish with (write) or bind with (read) `routing_key` on the
    /// topic exchange `exchange`? Only asked when [`ExternalAuthz::decides_topics`].
    fn topic(
        &self,
        user: &AuthzUser,
        vhost: &str,
        exchange: &str,
        access: Access,
        routing_key: &str,
        client_id: Option<&str>,
    ) -> bool;
}

/// One link of the chain.
#[derive(Debug, Clone)]
pub enum Backend {
    Internal,
    External(Arc<dyn ExternalBackend>),
}

/// The outcome of [`crate::auth::Auth::begin_login`].
#[derive(Debug)]
pub enum LoginStart {
    Done(Result<User, LoginError>),
    /// Decided later: the wake function is called once [`PendingLogin::take`]
    /// has the answer.
    Pending(PendingLogin),
}

/// A login waiting for an external backend.
#[derive(Debug, Clone, Default)]
pub struct PendingLogin {
    slot: Arc<Mutex<Option<Result<User, LoginError>>>>,
}

impl PendingLogin {
    /// The answer, once decided (taken: later calls return None).
    pub fn take(&self) -> Option<Result<User, LoginError>> {
        self.slot.lock().take()
    }

    pub(crate) fn fill(&self, result: Result<User, LoginError>) {
        *self.slot.lock() = Some(result);
    }
}
