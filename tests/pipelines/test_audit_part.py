"""The audit worker's handling of what an archive row says, without a model."""

from __future__ import annotations

from pipelines.audit import AuditSpec, PartAuditor


def test_a_rows_source_cannot_point_above_the_source_root():
    auditor = PartAuditor.__new__(PartAuditor)  # no codec or metrics needed for where a source is
    auditor.spec = AuditSpec(archive="a", report="r", model="m", source_root="/data/shards")
    assert auditor._source("s3://old-bucket/shards/x-0001.tar") == "/data/shards/x-0001.tar"
    for hostile in ("s3://old-bucket/..", "/", ".", "s3://b/shards/../"):
        assert auditor._source(hostile) is None, hostile
    auditor.spec = AuditSpec(archive="a", report="r", model="m")
    assert auditor._source("s3://old-bucket/shards/x-0001.tar") == "s3://old-bucket/shards/x-0001.tar"
