-- wrk script: POST pre-built request bodies in turn, then print the results as one JSON line.
--   wrk -t1 -c16 -d10s -s benchmarks/bodies.lua URL -- DIR COUNT CONTENT_TYPE [close|keep-alive] ["Name: value"]
-- DIR holds COUNT files 0000.bin, 0001.bin, ... (multipart bodies built by bench_service.py, or one empty
-- body for /ping). Requests are formatted once in init(): per request, wrk only picks the next string.
-- "close" sends Connection: close, so every request opens a new connection (which any worker may accept).
-- "Name: value" adds one more header to every request (Inference-Header-Content-Length for V2 binary bodies).

local requests = {}
local next_index = 0

function init(args)
  local dir, count, content_type = args[1], tonumber(args[2]), args[3]
  local headers = {["Content-Type"] = content_type}
  if args[4] == "close" then
    headers["Connection"] = "close"
  end
  local name, value = string.match(args[5] or "", "^([^:]+):%s*(.+)$")
  if name then
    headers[name] = value
  end
  for n = 0, count - 1 do
    local file = assert(io.open(string.format("%s/%04d.bin", dir, n), "rb"))
    local body = file:read("*a")
    file:close()
    requests[#requests + 1] = wrk.format("POST", nil, headers, body)
  end
  next_index = math.random(#requests) - 1 -- threads and runs start at different digits
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

function done(summary, latency, requests_stats)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, '
      .. '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, "p50_us": %d, "p95_us": %d, '
      .. '"p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
