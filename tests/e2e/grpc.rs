//! The gRPC surface on the same port: admin services, Publish, PublishStream, auth and limits.

use rewind_gateway::proto::v1 as pb;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::support::{Gateway, ROOT};

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    req
}

fn event(i: usize) -> pb::PublishEvent {
    pb::PublishEvent {
        payload: format!("{{\"i\":{i}}}").into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn admin_publish_and_stream_over_grpc() {
    let mut gw = Gateway::start(&[
        "--max-request-bytes",
        "200000",
        "--max-event-bytes",
        "100000",
    ])
    .await;
    let channel = Channel::from_shared(gw.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut teams = pb::team_service_client::TeamServiceClient::new(channel.clone());
    let mut tokens = pb::token_service_client::TokenServiceClient::new(channel.clone());
    let mut collections =
        pb::collection_service_client::CollectionServiceClient::new(channel.clone());
    let mut ingest = pb::ingest_service_client::IngestServiceClient::new(channel.clone());

    // No token / a team token on TeamService.
    let err = teams
        .create_team(pb::CreateTeamRequest { name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let team = teams
        .create_team(authed(
            pb::CreateTeamRequest {
                name: "acme".into(),
            },
            ROOT,
        ))
        .await
        .unwrap()
        .into_inner();
    let admin = team.admin_token;
    let err = teams
        .create_team(authed(pb::CreateTeamRequest { name: "y".into() }, &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let col = collections
        .create_collection(authed(
            pb::CreateCollectionRequest {
                name: "orders".into(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let got = collections
        .get_collection(authed(
            pb::GetCollectionRequest {
                id: "orders".into(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, col.id);
    let tok = tokens
        .create_token(authed(
            pb::CreateTokenRequest {
                name: "grpc".into(),
                scopes: vec![pb::Scope::Ingest as i32],
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(tok.token.starts_with("rw_"));
    let listed = tokens
        .list_tokens(authed(pb::ListTokensRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tokens.len(), 2);

    // Publish a batch.
    let resp = ingest
        .publish(authed(
            pb::PublishRequest {
                collection: col.id.clone(),
                events: (0..10).map(event).collect(),
                sequence: 7,
            },
            &tok.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.accepted, resp.sequence, resp.ids.len()), (10, 7, 10));

    // Bad input: malformed JSON, empty batch, unknown collection, oversized message, missing scope.
    let bad = pb::PublishEvent {
        payload: "{nope".into(),
        ..Default::default()
    };
    let err = ingest
        .publish(authed(
            pb::PublishRequest {
                collection: col.id.clone(),
                events: vec![bad],
                sequence: 0,
            },
            &tok.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("line 1"), "{}", err.message());
    let err = ingest
        .publish(authed(
            pb::PublishRequest {
                collection: col.id.clone(),
                events: vec![],
                sequence: 0,
            },
            &tok.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = ingest
        .publish(authed(
            pb::PublishRequest {
                collection: "nope".into(),
                events: vec![event(0)],
                sequence: 0,
            },
            &tok.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let huge = pb::PublishEvent {
        payload: vec![b'1'; 300_000].into(),
        ..Default::default()
    };
    let err = ingest
        .publish(authed(
            pb::PublishRequest {
                collection: col.id.clone(),
                events: vec![huge],
                sequence: 0,
            },
            &tok.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "decode limit: {err:?}");
    let err = ingest
        .publish(authed(
            pb::PublishRequest {
                collection: col.id.clone(),
                events: vec![event(0)],
                sequence: 0,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let raw = pb::PublishEvent {
        payload: vec![0xff, 0x00].into(),
        content_type: "application/octet-stream".into(),
        ..Default::default()
    };
    ingest
        .publish(authed(
            pb::PublishRequest {
                collection: col.id.clone(),
                events: vec![raw],
                sequence: 0,
            },
            &tok.token,
        ))
        .await
        .unwrap();

    // PublishStream: 50 batches of 20, an ack per batch, in order.
    let batches: Vec<pb::PublishRequest> = (0..50u64)
        .map(|seq| pb::PublishRequest {
            collection: col.id.clone(),
            events: (0..20).map(|i| event(i + seq as usize * 20)).collect(),
            sequence: seq,
        })
        .collect();
    let mut acks = ingest
        .publish_stream(authed(futures::stream::iter(batches), &tok.token))
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    let mut ids = Vec::new();
    while let Some(ack) = acks.message().await.unwrap() {
        assert_eq!(ack.accepted, 20);
        seqs.push(ack.sequence);
        ids.extend(ack.ids);
    }
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());

    // A stream whose third batch is bad: two acks, then the error.
    let batches = vec![
        pb::PublishRequest {
            collection: col.id.clone(),
            events: vec![event(0)],
            sequence: 0,
        },
        pb::PublishRequest {
            collection: col.id.clone(),
            events: vec![event(1)],
            sequence: 1,
        },
        pb::PublishRequest {
            collection: "nope".into(),
            events: vec![event(2)],
            sequence: 2,
        },
    ];
    let mut acks = ingest
        .publish_stream(authed(futures::stream::iter(batches), &tok.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().sequence, 0);
    assert_eq!(acks.message().await.unwrap().unwrap().sequence, 1);
    assert_eq!(acks.message().await.unwrap_err().code(), Code::NotFound);

    // Revoke over gRPC: the token stops working at once.
    tokens
        .revoke_token(authed(
            pb::RevokeTokenRequest { id: tok.id.clone() },
            &admin,
        ))
        .await
        .unwrap();
    let err = ingest
        .publish(authed(
            pb::PublishRequest {
                collection: col.id.clone(),
                events: vec![event(0)],
                sequence: 0,
            },
            &tok.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Everything acknowledged is on the bus.
    gw.terminate();
    let on_bus: std::collections::HashSet<String> = gw.bus_ids(&[]).into_iter().collect();
    assert_eq!(on_bus.len(), 10 + 1 + 1000 + 2);
    assert!(ids.iter().all(|id| on_bus.contains(id)));
}
