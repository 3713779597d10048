"""The deployment files parse and call the real entry points with valid arguments."""

from __future__ import annotations

import os
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _load(name):
    return yaml.safe_load((INFRA / name).read_text())


@pytest.mark.parametrize("name, job", [("kuberay/rayjob-compress.yaml", "compress"), ("kuberay/rayjob-decode.yaml", "decode")])
def test_rayjobs_run_the_real_jobs_and_resume_on_retry(name, job):
    doc = _load(name)
    assert doc["kind"] == "RayJob" and doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["rdeic-job", job]
    args = build_parser().parse_args(argv[1:])  # exits on any unknown or missing argument
    assert args.job == job and "--overwrite" not in argv  # a retry must resume, never replace
    assert args.device == "cuda"  # GPU workers, also where the cluster autoscales them from zero
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu = workers[0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1 and gpu["requests"]["nvidia.com/gpu"] == 1
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_raycluster_has_a_gpu_worker_group():
    doc = _load("kuberay/raycluster.yaml")
    assert doc["kind"] == "RayCluster"
    group = doc["spec"]["workerGroupSpecs"][0]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_cluster_launcher_config():
    doc = _load("ray-cluster.yaml")
    assert doc["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    # GPU nodes start at zero: only jobs that ask for GPUs (--device cuda) make the autoscaler start them
    assert doc["available_node_types"]["gpu_worker"]["min_workers"] == 0 and "--device cuda" in (INFRA / "ray-cluster.yaml").read_text()
    assert doc["head_node_type"] in doc["available_node_types"]


def test_container_installs_the_locked_set():
    text = (INFRA / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0-py311" in text
    assert "-c requirements.lock" in text
    lock = (INFRA.parent / "requirements.lock").read_text().splitlines()
    assert "ray==2.60.0" in lock and "torch==2.14.1" in lock


# ---- the scheduled audit (infra/kuberay/audit-*.yaml) ----

def _load_all(name):
    return [doc for doc in yaml.safe_load_all((INFRA / name).read_text()) if doc]


def _one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _audit_rayjob(run_id="2026-11-29T0300Z", name="rdeic-audit-29932020"):
    """The RayJob the CronJob's pod creates, from the template in its ConfigMap."""
    template = _one(_load_all("kuberay/audit-cronjob.yaml"), "ConfigMap", "rdeic-audit-rayjob")["data"]["rayjob.yaml"]
    return yaml.safe_load(template.replace("__RAYJOB_NAME__", name).replace("__RUN_ID__", run_id))


def _submit_container():
    cron = _one(_load_all("kuberay/audit-cronjob.yaml"), "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _check_thresholds_mount(spec, argv):
    """--thresholds names a file of the head's ConfigMap mount (the driver runs on the head) that parses."""
    path = argv[argv.index("--thresholds") + 1]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
    assert {"key": key, "path": key} in volume["configMap"]["items"]
    return volume["configMap"]["name"], key


def test_audit_cronjob_is_a_forbidding_cronjob_with_deadline_history_and_rbac():
    docs = _load_all("kuberay/audit-cronjob.yaml")
    cron = _one(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 0 < spec["startingDeadlineSeconds"] <= 86400
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    assert spec["timeZone"] == "Etc/UTC"  # the run id is the scheduled time in UTC
    assert len(cron["metadata"]["name"]) <= 52  # the Job's name adds -<unix minutes>
    job = spec["jobTemplate"]["spec"]
    assert 0 < job["backoffLimit"] <= 3
    rayjob = _audit_rayjob()
    deadline = rayjob["spec"]["activeDeadlineSeconds"] * (rayjob["spec"]["backoffLimit"] + 1)
    assert deadline < job["activeDeadlineSeconds"] < 86400  # outlives the audit, never blocks the next day's tick

    pod, container = _submit_container()
    assert pod["restartPolicy"] == "Never"
    account = _one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    role = _one(docs, "Role")
    assert any(r["apiGroups"] == ["ray.io"] and "rayjobs" in r["resources"] and {"create", "get"} <= set(r["verbs"])
               for r in role["rules"])
    binding = _one(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    # The template the pod reads is the ConfigMap mounted where RAYJOB_TEMPLATE points.
    env = {e["name"]: e for e in container["env"]}
    template = env["RAYJOB_TEMPLATE"]["value"]
    mount = next(m for m in container["volumeMounts"] if template.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "rdeic-audit-rayjob"
    assert template.rsplit("/", 1)[1] in _one(docs, "ConfigMap", "rdeic-audit-rayjob")["data"]


def test_audit_cronjob_run_id_comes_from_the_job_name_label():
    _, container = _submit_container()
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    script = container["command"][-1]
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert '"${JOB_NAME##*-}"' in script and "kubectl create -f -" in script and "AlreadyExists" in script
    rayjob = _audit_rayjob(run_id="RUN", name="NAME")
    assert rayjob["metadata"]["name"] == "NAME"
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[argv.index("--run-id") + 1] == "RUN"


def _run_submit(tmp_path, job_name, final="Complete/SUCCEEDED"):
    """Run the CronJob pod's script here, against a kubectl that records what it is asked to create."""
    _, container = _submit_container()
    template = tmp_path / "rayjob.yaml"
    template.write_text(_one(_load_all("kuberay/audit-cronjob.yaml"), "ConfigMap", "rdeic-audit-rayjob")["data"]["rayjob.yaml"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(
        '#!/bin/sh\n'
        'case "$1" in\n'
        '  create) if [ -e "$STATE/created.yaml" ]; then\n'
        '            echo "Error from server (AlreadyExists): rayjobs.ray.io \\"x\\" already exists" >&2; exit 1; fi\n'
        '          cat > "$STATE/created.yaml"; echo "$*" >> "$STATE/calls" ;;\n'
        '  get) echo "$*" >> "$STATE/calls"; n=$(grep -c "^get" "$STATE/calls")\n'
        '       if [ "$n" -lt 2 ]; then printf Running/RUNNING; else printf "%s" "$FINAL"; fi ;;\n'
        '  *) exit 64 ;;\n'
        'esac\n')
    kubectl.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "JOB_NAME": job_name, "RAYJOB_TEMPLATE": str(template),
           "POLL_SECONDS": "0", "STATE": str(tmp_path), "FINAL": final}
    return subprocess.run(["/bin/sh", "-c", container["command"][-1]], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs /bin/sh")
def test_audit_cronjob_pod_submits_once_per_scheduled_time(tmp_path):
    minutes = 29932020  # 2026-11-29 03:00 UTC
    expected = datetime.fromtimestamp(minutes * 60, timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    assert expected == "2026-11-29T0300Z"
    first = _run_submit(tmp_path, f"rdeic-audit-{minutes}")
    assert first.returncode == 0, first.stderr
    assert f"submitted RayJob rdeic-audit-{minutes}, run id {expected}" in first.stdout
    created = yaml.safe_load((tmp_path / "created.yaml").read_text())
    assert created["kind"] == "RayJob" and created["metadata"]["name"] == f"rdeic-audit-{minutes}"
    assert created["metadata"]["labels"]["rdeic-archive/run-id"] == expected
    argv = shlex.split(created["spec"]["entrypoint"])
    assert argv[argv.index("--run-id") + 1] == expected
    # The same tick again (a retried pod): nothing new is created, the pod waits for the existing RayJob.
    before = (tmp_path / "created.yaml").read_bytes()
    again = _run_submit(tmp_path, f"rdeic-audit-{minutes}", final="Complete/FAILED")
    assert (tmp_path / "created.yaml").read_bytes() == before
    assert "already exists: waiting for it" in again.stdout
    assert again.returncode == 2 and f"run {expected} ended Complete/FAILED" in again.stderr  # podFailurePolicy: FailJob
    cron = _one(_load_all("kuberay/audit-cronjob.yaml"), "CronJob")
    rule = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    # A Job name without a scheduled time (a hand-made Job) is refused before anything is created.
    (tmp_path / "manual").mkdir()
    bad = _run_submit(tmp_path / "manual", "rdeic-audit-manual")
    assert bad.returncode == 1 and "no scheduled time in the job name 'rdeic-audit-manual'" in bad.stderr
    assert not (tmp_path / "manual" / "created.yaml").exists()


def test_audit_cronjob_rayjob_runs_the_audit_with_run_id_and_mounted_thresholds():
    from pipelines.gate import load_rules

    rayjob = _audit_rayjob()
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["rdeic-job", "audit"] and "--overwrite" not in argv
    assert argv[argv.index("--run-id") + 1] == "2026-11-29T0300Z"
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
    config_map, key = _check_thresholds_mount(spec, argv)
    thresholds = _one(_load_all("kuberay/audit-cronjob.yaml"), "ConfigMap", config_map)["data"][key]
    assert load_rules(thresholds, key)  # the example parses, and gates something


def test_audit_raycronjob_uses_the_default_run_id_and_the_same_thresholds():
    docs = _load_all("kuberay/audit-raycronjob.yaml")
    cron = _one(docs, "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1"
    spec = cron["spec"]
    hour = spec["schedule"].split()[1]
    assert hour.isdigit() and 1 <= int(hour) <= 20  # away from midnight UTC: a retry keeps the day's run id
    assert "concurrencyPolicy" not in spec  # RayCronJob has none: the report root's lock refuses overlap
    job = spec["jobTemplate"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["rdeic-job", "audit"] and "--run-id" not in argv and "--overwrite" not in argv
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1
    config_map, key = _check_thresholds_mount(job, argv)
    assert _one(docs, "ConfigMap", config_map) == _one(_load_all("kuberay/audit-cronjob.yaml"), "ConfigMap", config_map)
    text = (INFRA / "kuberay/audit-raycronjob.yaml").read_text()
    assert "RayCronJob=true" in text and "1.6" in text  # the feature gate and the version that has it


@pytest.mark.parametrize("entrypoint", [
    pytest.param(lambda: _audit_rayjob()["spec"]["entrypoint"], id="cronjob"),
    pytest.param(lambda: _one(_load_all("kuberay/audit-raycronjob.yaml"), "RayCronJob")["spec"]["jobTemplate"]["entrypoint"],
                 id="raycronjob"),
])
def test_audit_entrypoints_parse_with_the_real_cli(entrypoint):
    argv = shlex.split(entrypoint())
    args = build_parser().parse_args(argv[1:])  # exits on any unknown or missing argument
    assert args.job == "audit" and args.device == "cuda"
    assert args.thresholds == "/etc/rdeic/thresholds.yaml"
