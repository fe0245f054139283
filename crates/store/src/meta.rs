//! Durable metadata (exchanges, queues, bindings, counters, and adapters' own
//! records such as MQTT retained messages and sessions) in an embedded ACID
//! database (redb), one file in the data directory.
//!
//! Every change is its own committed transaction: metadata changes are rare
//! (declare, bind, delete), and a client's declare-ok must mean the entity survives
//! a crash. Values are postcard-encoded records from the core's `persist` module;
//! adapter records are stored as the adapter encoded them.

use std::io;
use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use switchyard_core::admin::MetaWrite;
use switchyard_core::exchange::DestinationName;
use switchyard_core::persist::{BindingRecord, ExchangeRecord, QueueRecord};

/// `vhost \0 name` -> ExchangeRecord
const EXCHANGES: TableDefinition<&str, &[u8]> = TableDefinition::new("exchanges");
/// `vhost \0 name` -> QueueRecord
const QUEUES: TableDefinition<&str, &[u8]> = TableDefinition::new("queues");
/// encoded BindingRecord (its own identity) -> ()
const BINDINGS: TableDefinition<&[u8], ()> = TableDefinition::new("bindings");
/// name -> counter value
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// `kind \0 key` -> an adapter's own encoded record (the store does not read it).
/// One table for every kind: a kind's records are the range of its prefix.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

thread_local! {
    /// Set while this thread runs [`MetaStore::bulk`]'s work.
    static IN_BULK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

fn encode<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(io_err)
}

fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(io_err)
}

#[derive(Debug)]
pub struct MetaStore {
    db: Database,
}

impl MetaStore {
    pub fn open(path: &Path) -> io::Result<Self> {
        let db = Database::create(path).map_err(io_err)?;
        // Create the tables so that reads of a fresh database find them.
        let txn = db.begin_write().map_err(io_err)?;
        txn.open_table(EXCHANGES).map_err(io_err)?;
        txn.open_table(QUEUES).map_err(io_err)?;
        txn.open_table(BINDINGS).map_err(io_err)?;
        txn.open_table(COUNTERS).map_err(io_err)?;
        txn.open_table(RECORDS).map_err(io_err)?;
        txn.commit().map_err(io_err)?;
        Ok(MetaStore { db })
    }

    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> io::Result<()>) -> io::Result<()> {
        let mut txn = self.db.begin_write().map_err(io_err)?;
        if IN_BULK.get() {
            txn.set_durability(Durability::None).map_err(io_err)?;
        }
        f(&txn)?;
        txn.commit().map_err(io_err)
    }

    /// Runs `work` with this thread's commits not waiting for the disk, then
    /// one durable commit, which makes every earlier commit durable too
    /// (redb's `Durability::None` contract). The flag is per thread because
    /// the bulk caller (a definitions import) runs synchronously on one
    /// thread, while other clients' declares on other threads must keep
    /// committing durably before their replies.
    pub fn bulk(&self, work: &mut dyn FnMut()) -> io::Result<()> {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                IN_BULK.set(false);
            }
        }
        {
            let _reset = Reset;
            IN_BULK.set(true);
            work();
        }
        self.write(|_| Ok(()))
    }

    pub fn save_exchange(&self, r: &ExchangeRecord) -> io::Result<()> {
        let value = encode(r)?;
        self.write(|txn| {
            let mut t = txn.open_table(EXCHANGES).map_err(io_err)?;
            t.insert(key(&r.vhost, &r.name).as_str(), value.as_slice())
                .map_err(io_err)?;
            Ok(())
        })
    }

    pub fn save_queue(&self, r: &QueueRecord) -> io::Result<()> {
        let value = encode(r)?;
        self.write(|txn| {
            let mut t = txn.open_table(QUEUES).map_err(io_err)?;
            t.insert(key(&r.vhost, &r.name).as_str(), value.as_slice())
                .map_err(io_err)?;
            Ok(())
        })
    }

    pub fn save_binding(&self, r: &BindingRecord) -> io::Result<()> {
        let k = encode(r)?;
        self.write(|txn| {
            let mut t = txn.open_table(BINDINGS).map_err(io_err)?;
            t.insert(k.as_slice(), ()).map_err(io_err)?;
            Ok(())
        })
    }

    pub fn delete_binding(&self, r: &BindingRecord) -> io::Result<()> {
        let k = encode(r)?;
        self.write(|txn| {
            let mut t = txn.open_table(BINDINGS).map_err(io_err)?;
            t.remove(k.as_slice()).map_err(io_err)?;
            Ok(())
        })
    }

    /// Deletes an exchange and the bindings from or to it, in one transaction.
    pub fn delete_exchange(&self, vhost: &str, name: &str) -> io::Result<()> {
        let dest = DestinationName::Exchange(name.to_owned());
        self.write(|txn| {
            txn.open_table(EXCHANGES)
                .map_err(io_err)?
                .remove(key(vhost, name).as_str())
                .map_err(io_err)?;
            remove_bindings(txn, |b| {
                b.vhost == vhost && (b.source == name || b.destination == dest)
            })
        })
    }

    /// Deletes a queue and the bindings to it, in one transaction.
    pub fn delete_queue(&self, vhost: &str, name: &str) -> io::Result<()> {
        let dest = DestinationName::Queue(name.to_owned());
        self.write(|txn| {
            txn.open_table(QUEUES)
                .map_err(io_err)?
                .remove(key(vhost, name).as_str())
                .map_err(io_err)?;
            remove_bindings(txn, |b| b.vhost == vhost && b.destination == dest)
        })
    }

    /// Increments and returns a named counter.
    pub fn next(&self, counter: &str) -> io::Result<u64> {
        let mut value = 0;
        self.write(|txn| {
            let mut t = txn.open_table(COUNTERS).map_err(io_err)?;
            let current = t.get(counter).map_err(io_err)?.map_or(0, |v| v.value());
            value = current.saturating_add(1);
            t.insert(counter, value).map_err(io_err)?;
            Ok(())
        })?;
        Ok(value)
    }

    pub fn save_record(&self, kind: &str, k: &str, value: &[u8]) -> io::Result<()> {
        self.write(|txn| {
            let mut t = txn.open_table(RECORDS).map_err(io_err)?;
            t.insert(key(kind, k).as_str(), value).map_err(io_err)?;
            Ok(())
        })
    }

    pub fn delete_record(&self, kind: &str, k: &str) -> io::Result<()> {
        self.write(|txn| {
            let mut t = txn.open_table(RECORDS).map_err(io_err)?;
            t.remove(key(kind, k).as_str()).map_err(io_err)?;
            Ok(())
        })
    }

    /// Commits the writes of one metadata command in one transaction.
    pub fn apply(&self, writes: &[MetaWrite]) -> io::Result<()> {
        self.write(|txn| {
            for w in writes {
                match w {
                    MetaWrite::Put {
                        kind,
                        key: k,
                        value,
                    } => {
                        let mut t = txn.open_table(RECORDS).map_err(io_err)?;
                        t.insert(key(kind, k).as_str(), value.as_slice())
                            .map_err(io_err)?;
                    }
                    MetaWrite::Delete { kind, key: k } => {
                        let mut t = txn.open_table(RECORDS).map_err(io_err)?;
                        t.remove(key(kind, k).as_str()).map_err(io_err)?;
                    }
                    MetaWrite::DeletePrefix { kind, prefix } => {
                        let mut t = txn.open_table(RECORDS).map_err(io_err)?;
                        let from = key(kind, prefix);
                        let to = format!("{kind}\u{1}");
                        let mut doomed = Vec::new();
                        for entry in t.range(from.as_str()..to.as_str()).map_err(io_err)? {
                            let (k, _) = entry.map_err(io_err)?;
                            let k = k.value();
                            if !k.starts_with(from.as_str()) {
                                break;
                            }
                            doomed.push(k.to_owned());
                        }
                        for k in doomed {
                            t.remove(k.as_str()).map_err(io_err)?;
                        }
                    }
                    MetaWrite::DeleteVhostEntities { vhost } => {
                        let prefix = format!("{vhost}\0");
                        for table in [EXCHANGES, QUEUES] {
                            let mut t = txn.open_table(table).map_err(io_err)?;
                            let mut doomed = Vec::new();
                            for entry in t.iter().map_err(io_err)? {
                                let (k, _) = entry.map_err(io_err)?;
                                if k.value().starts_with(prefix.as_str()) {
                                    doomed.push(k.value().to_owned());
                                }
                            }
                            for k in doomed {
                                t.remove(k.as_str()).map_err(io_err)?;
                            }
                        }
                        remove_bindings(txn, |b| &b.vhost == vhost)?;
                        // Adapters' records of the vhost (keyed `vhost \0 ...`,
                        // kinds outside `meta.`): MQTT sessions and retained
                        // messages go with it.
                        let mut t = txn.open_table(RECORDS).map_err(io_err)?;
                        let mut doomed = Vec::new();
                        for entry in t.iter().map_err(io_err)? {
                            let (k, _) = entry.map_err(io_err)?;
                            let k = k.value();
                            if let Some((kind, rest)) = k.split_once('\0') {
                                if !kind.starts_with("meta.") && rest.starts_with(prefix.as_str()) {
                                    doomed.push(k.to_owned());
                                }
                            }
                        }
                        for k in doomed {
                            t.remove(k.as_str()).map_err(io_err)?;
                        }
                    }
                }
            }
            Ok(())
        })
    }

    /// The records of one kind, keys without the `kind \0` prefix.
    pub fn records(&self, kind: &str) -> io::Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let t = txn.open_table(RECORDS).map_err(io_err)?;
        // `kind \0` .. `kind \x01`: exactly the keys with this kind's prefix
        // (a kind containing `\0` would be ambiguous; kinds are adapter constants).
        let from = format!("{kind}\0");
        let to = format!("{kind}\u{1}");
        let mut out = Vec::new();
        for entry in t.range(from.as_str()..to.as_str()).map_err(io_err)? {
            let (k, v) = entry.map_err(io_err)?;
            let k = k.value();
            let name = k.strip_prefix(from.as_str()).unwrap_or(k);
            out.push((name.to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Everything stored, for recovery.
    pub fn load(&self) -> io::Result<(Vec<ExchangeRecord>, Vec<QueueRecord>, Vec<BindingRecord>)> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let mut exchanges = Vec::new();
        for entry in txn
            .open_table(EXCHANGES)
            .map_err(io_err)?
            .iter()
            .map_err(io_err)?
        {
            let (_, v) = entry.map_err(io_err)?;
            exchanges.push(decode(v.value())?);
        }
        let mut queues = Vec::new();
        for entry in txn
            .open_table(QUEUES)
            .map_err(io_err)?
            .iter()
            .map_err(io_err)?
        {
            let (_, v) = entry.map_err(io_err)?;
            queues.push(decode(v.value())?);
        }
        let mut bindings = Vec::new();
        for entry in txn
            .open_table(BINDINGS)
            .map_err(io_err)?
            .iter()
            .map_err(io_err)?
        {
            let (k, _) = entry.map_err(io_err)?;
            bindings.push(decode(k.value())?);
        }
        Ok((exchanges, queues, bindings))
    }
}

fn remove_bindings(
    txn: &redb::WriteTransaction,
    doomed: impl Fn(&BindingRecord) -> bool,
) -> io::Result<()> {
    let mut t = txn.open_table(BINDINGS).map_err(io_err)?;
    let mut keys = Vec::new();
    for entry in t.iter().map_err(io_err)? {
        let (k, _) = entry.map_err(io_err)?;
        let record: BindingRecord = decode(k.value())?;
        if doomed(&record) {
            keys.push(k.value().to_vec());
        }
    }
    for k in keys {
        t.remove(k.as_slice()).map_err(io_err)?;
    }
    Ok(())
}
