"""lnfm.jobs.heldout.paste_hosts: a peer's node-paste hosts are the store's training scans, never a
validation or test scan and never one of the labelled training cases."""

from lnfm.data.store import read_manifest
from lnfm.jobs.heldout import paste_hosts


def test_hosts_are_the_training_split_less_the_labelled_cases(stores):
    labelled, unlabelled, _ = stores
    rows = read_manifest(labelled)
    train = sorted(r["case_id"] for r in rows if r["split"] == "train")
    assert len(train) >= 3 and {r["split"] for r in rows} == {"train", "val", "test"}
    hosts = paste_hosts(labelled, train[:2])
    assert sorted(r["case_id"] for _, r in hosts) == train[2:]
    assert all(store == labelled for store, _ in hosts)
    assert sorted(r["case_id"] for _, r in paste_hosts(unlabelled)) == sorted(
        r["case_id"] for r in read_manifest(unlabelled))
