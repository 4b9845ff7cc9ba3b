"""mitmproxy script: record every SSE / NDJSON stream.

mitmdump -s mitm_sse/record.py [--set sse_dir=DIR] [--set sse_filter='~d api.openai.com']

SSEView (after the Recorder, whose stream tap it wraps) adds the "SSE" content view to mitmweb / the console.
"""

import sys
from pathlib import Path

try:
    from mitm_sse.contentview import SSEView
    from mitm_sse.recorder import Recorder
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mitm_sse.contentview import SSEView
    from mitm_sse.recorder import Recorder

addons = [Recorder(), SSEView()]
