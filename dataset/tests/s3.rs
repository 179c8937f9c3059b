//! plan and read_shard against a real S3 server (s3s-fs), configured the standard AWS
//! way through the environment, as workers and the coordinator are. Its own test binary:
//! setting the environment here affects no other test.

use std::time::Duration;

use loupe_core::task::ShardSource;
use loupe_testsupport::S3Server;

fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[tokio::test]
async fn plans_and_reads_a_dataset_in_s3() {
    let server = S3Server::start(&["data"]);
    for (k, v) in server.env() {
        std::env::set_var(k, v);
    }
    let run = async {
        let uri = "s3://data/imagenet-val";
        let store = loupe_core::store::open(uri).await.unwrap();
        for key in ["b.jpg", "a.PNG", "c.jpeg", "labels.csv"] {
            store.put(key, key.as_bytes().to_vec()).await.unwrap();
        }
        store
            .put(
                "shards/0000.tar",
                tar_of(&[("x.jpg", b"x"), ("x.cls", b"1"), ("y.png", b"y")]),
            )
            .await
            .unwrap();
        store
            .put("shards/bad.tar", b"this is not a tar archive".repeat(40))
            .await
            .unwrap();

        let plan = loupe_dataset::plan(uri, 2).await.unwrap();
        let images = |keys: &[&str]| ShardSource::Images {
            keys: keys.iter().map(|k| k.to_string()).collect(),
        };
        assert_eq!(
            plan,
            vec![
                images(&["a.PNG", "b.jpg"]),
                images(&["c.jpeg"]),
                ShardSource::Tar {
                    key: "shards/0000.tar".into()
                },
                ShardSource::Tar {
                    key: "shards/bad.tar".into()
                },
            ]
        );
        let got = loupe_dataset::read_shard(&*store, &plan[0]).await.unwrap();
        assert_eq!(
            got.iter()
                .map(|r| (r.id.as_str(), r.bytes.as_slice()))
                .collect::<Vec<_>>(),
            [("a.PNG", &b"a.PNG"[..]), ("b.jpg", b"b.jpg")]
        );
        let got = loupe_dataset::read_shard(&*store, &plan[2]).await.unwrap();
        assert_eq!(
            got.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["shards/0000.tar/x.jpg", "shards/0000.tar/y.png"]
        );
        let err = loupe_dataset::read_shard(&*store, &plan[3])
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("shard shards/bad.tar is not a tar archive"),
            "{err}"
        );

        let err = loupe_dataset::plan("s3://data/nothing-here", 2)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("s3://data/nothing-here")
                && err.to_string().contains("no images found"),
            "{err}"
        );
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the S3 dataset test hung");
}
