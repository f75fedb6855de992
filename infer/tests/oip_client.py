"""A stock Open Inference Protocol client (tritonclient[http]) and the Prometheus project's own
OpenMetrics parser (prometheus_client) against a running `retina-infer serve`.

Run by infer/tests/oip.rs: python oip_client.py HOST:PORT IMAGE1 IMAGE2. Prints OK at the end;
any failed check raises.
"""

import json
import sys
import urllib.request

import numpy as np
import tritonclient.http as httpclient
from prometheus_client.openmetrics.parser import text_string_to_metric_families

url, paths = sys.argv[1], sys.argv[2:]
images = [open(p, "rb").read() for p in paths]
client = httpclient.InferenceServerClient(url=url)

assert client.is_server_live()
assert client.is_server_ready()
assert client.is_model_ready("retina")
meta = client.get_model_metadata("retina")
assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}], meta
outputs = {o["name"]: o for o in meta["outputs"]}
assert outputs["diagnosis_probabilities"] == {
    "name": "diagnosis_probabilities", "datatype": "FP32", "shape": [-1, 5]}, outputs
for name in ["referable_probability", "fluid_probability", "vessel_growth"]:
    assert outputs[name]["datatype"] == "FP32", outputs[name]
assert outputs["referable"]["datatype"] == "BOOL"
version = meta["versions"][0]
server = client.get_server_metadata()
assert "binary_tensor_data" in server["extensions"], server


def v1(image):
    req = urllib.request.Request(f"http://{url}/v1/predict", data=image, method="POST")
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def infer(batch, binary_in, binary_out, outputs=None):
    inp = httpclient.InferInput("image", [len(batch)], "BYTES")
    inp.set_data_from_numpy(np.array(batch, dtype=np.object_), binary_data=binary_in)
    requested = None
    if outputs is not None:
        requested = [httpclient.InferRequestedOutput(o, binary_data=binary_out) for o in outputs]
    return client.infer("retina", [inp], outputs=requested, request_id="check-1")


# Each image of a batch gets its own answer, equal to /v1's for that image alone.
expected = [v1(img) for img in images]
for binary_in, binary_out, outputs in [
    (True, True, None),  # tritonclient's defaults: binary both ways, every output
    (True, False, ["diagnosis_probabilities", "referable", "vessel_growth", "fluid_present"]),
]:
    r = infer(images, binary_in, binary_out, outputs)
    probs = r.as_numpy("diagnosis_probabilities")
    assert probs.shape == (len(images), 5), probs.shape
    assert probs.dtype == np.float32
    for i, e in enumerate(expected):
        assert np.allclose(probs[i], e["diagnosis"]["probabilities"], atol=1e-5), (i, probs[i], e)
        assert bool(r.as_numpy("referable")[i]) == e["diagnosis"]["referable"]
        assert abs(float(r.as_numpy("vessel_growth")[i]) - e["vessel_growth"]["amount"]) < 1e-5
        assert bool(r.as_numpy("fluid_present")[i]) == e["fluid"]["present"]
    if outputs is None:
        grades = r.as_numpy("diagnosis_grade")
        assert grades.dtype == np.int64
        assert list(grades) == [e["diagnosis"]["grade"] for e in expected], grades
        p_ref = r.as_numpy("referable_probability")
        assert np.allclose(p_ref, [e["diagnosis"]["referable_probability"] for e in expected], atol=1e-5)
    else:
        assert r.as_numpy("referable_probability") is None, "an output not asked for came back"
    resp = r.get_response()
    assert resp["model_name"] == "retina" and resp["model_version"] == version, resp
    assert resp["id"] == "check-1", resp

# An operating point by parameter.
inp = httpclient.InferInput("image", [1], "BYTES")
inp.set_data_from_numpy(np.array([images[0]], dtype=np.object_), binary_data=True)
r = client.infer("retina", [inp], parameters={"operating_point": "confirmation"})
assert r.get_response()["parameters"]["operating_point"] == "confirmation"

# Errors arrive as the protocol's {"error": ...}, which the client raises.
for bad_model in ["nope"]:
    try:
        client.infer(bad_model, [inp])
        raise AssertionError("an unknown model was answered")
    except httpclient.InferenceServerException as e:
        assert "no model" in str(e), e
try:
    garbage = httpclient.InferInput("image", [1], "BYTES")
    garbage.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_), binary_data=True)
    client.infer("retina", [garbage])
    raise AssertionError("garbage was answered")
except httpclient.InferenceServerException as e:
    assert "not an image" in str(e), e

# /metrics parses with the reference parser, with the counters the traffic above must show.
with urllib.request.urlopen(f"http://{url}/metrics") as r:
    families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
requests = families["retina_http_requests"]
infer_ok = sum(
    s.value for s in requests.samples
    if s.labels.get("route") == "/v2/models/{name}/infer" and s.labels.get("status") == "200")
assert infer_ok >= 3, requests.samples
assert any(s.labels.get("status") == "404" for s in requests.samples), requests.samples
batch = families["retina_batch_size"]
count = [s.value for s in batch.samples if s.name == "retina_batch_size_count"][0]
assert count >= 1, batch.samples
images_total = [s.value for s in families["retina_images_predicted"].samples][0]
assert images_total >= 3 * len(images), images_total
model = families["retina_model"].samples
assert [(s.labels["name"], s.labels["version"], s.value) for s in model] == [("retina", version, 1.0)], model
assert families["retina_build"].samples[0].labels["version"], families["retina_build"].samples
assert "retina_model_load_seconds" in families
print("OK")
