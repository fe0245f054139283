//! The IoT dashboard: simulated MQTT sensors publish readings; a web page gets
//! them over STOMP/WebSocket, live. The page (examples/dashboard/index.html)
//! subscribes to `/topic/sensors.#`; each MQTT publish to
//! `sensors/<room>/<metric>` reaches it as `/topic/sensors.<room>.<metric>`
//! (INTEROP.md: MQTT topics map to `amq.topic` keys, `/` becoming `.`).
//!
//! Run a broker (`cargo run --release`), then:
//!
//! ```text
//! cargo run --example sensor_dashboard             # serves the page, runs 3 sensors
//! cargo run --example sensor_dashboard -- --serve  # serves the page only
//! ```
//!
//! and open the URL it prints. `MQTT_ADDR` (default `127.0.0.1:1883`),
//! `STOMP_WS_URL` (default `ws://127.0.0.1:15674/ws`) and `DASHBOARD_ADDR`
//! (default `127.0.0.1:8080`) point it elsewhere.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PAGE: &str = include_str!("dashboard/index.html");
const ROOMS: [&str; 3] = ["kitchen", "office", "lab"];

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Serves the page on every path: it is the only file, and it needs nothing else.
async fn serve_page(addr: String) {
    let listener = TcpListener::bind(&addr).await.unwrap();
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut request = [0u8; 4096];
            // One read is enough for a browser's GET; the request is not used.
            let _ = socket.read(&mut request).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{PAGE}",
                PAGE.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

/// One simulated sensor per room: temperature and humidity every second, QoS 1.
async fn run_sensors(mqtt_addr: String) {
    let (host, port) = mqtt_addr.rsplit_once(':').unwrap();
    let mut options = MqttOptions::new("dashboard-sensors", host, port.parse().unwrap());
    options.set_credentials("guest", "guest");
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 64);
    tokio::spawn(async move {
        loop {
            if let Err(e) = events.poll().await {
                println!("sensors: MQTT connection error ({e}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    let mut tick: u64 = 0;
    loop {
        for (i, room) in ROOMS.iter().enumerate() {
            // A gentle wave per room, so the numbers move.
            let phase = (tick as f64 / 10.0) + i as f64;
            let temp = 20.0 + 2.0 * phase.sin() + i as f64;
            let humidity = 45.0 + 5.0 * phase.cos();
            for (metric, value) in [
                ("temp", format!("{temp:.1}")),
                ("humidity", format!("{humidity:.0}")),
            ] {
                let topic = format!("sensors/{room}/{metric}");
                if tick.is_multiple_of(10) && i == 0 {
                    println!("sensors: {topic} = {value} (and the others, every second)");
                }
                client
                    .publish(topic, QoS::AtLeastOnce, false, value.into_bytes())
                    .await
                    .unwrap();
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::main]
async fn main() {
    let serve_only = std::env::args().any(|a| a == "--serve");
    let page_addr = env("DASHBOARD_ADDR", "127.0.0.1:8080");
    let ws_url = env("STOMP_WS_URL", "ws://127.0.0.1:15674/ws");
    println!("dashboard: open http://{page_addr}/?ws={ws_url}");
    let page = tokio::spawn(serve_page(page_addr));
    if !serve_only {
        let mqtt_addr = env("MQTT_ADDR", "127.0.0.1:1883");
        println!("sensors: publishing to MQTT at {mqtt_addr}");
        tokio::spawn(run_sensors(mqtt_addr));
    }
    page.await.unwrap();
}
