"""The peer for bench/serve.py --peer litserve: the same exported model, tokenizer and scoring code as
predict_sentiment.py --serve, behind LitServe's batching instead of ours. POST /predict {"texts": [one text]} answers
{"label", "score"}; GET /health is LitServe's own. 127.0.0.1 only.

    python bench/litserve_peer.py --output-dir bench/runs/inference --runtime onnx-int8 --port 8123
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import litserve  # noqa: E402

import predict_sentiment as pst  # noqa: E402


class SentimentAPI(litserve.LitAPI):
    """predict_sentiment's predict() on LitServe's batches: one text a request, as the load generator sends."""

    def __init__(self, folder: Path, runtime: str, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.folder, self.runtime = folder, runtime

    def setup(self, device):
        self.model, self.tokenizer = pst.load_exported(self.folder, self.runtime)

    def decode_request(self, request):
        return request["texts"][0]

    def batch(self, inputs):
        return list(inputs)

    def predict(self, texts):
        return pst.predict(self.model, self.tokenizer, texts, len(texts))

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"label": output[0], "score": output[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--runtime", default="onnx-int8", choices=("onnx", "onnx-int8", "openvino"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=pst.BATCH_SIZE)  # what our server batches by
    parser.add_argument("--batch-timeout", type=float, default=pst.MAX_WAIT_MS / 1000)
    args = parser.parse_args()
    api = SentimentAPI(Path(args.output_dir) / "onnx", args.runtime, args.max_batch_size, args.batch_timeout)
    server = litserve.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
