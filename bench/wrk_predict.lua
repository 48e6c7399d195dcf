-- wrk script for bench/serving.py: POST one held-out sentence per request and
-- print the run's summary as one JSON line (marked WRKJSON) from done().
--
--   wrk -t2 -c32 -d6s -s bench/wrk_predict.lua URL/predict -- BODIES_FILE
--
-- BODIES_FILE holds one JSON request body per line; each wrk thread cycles
-- through them from its own offset, so concurrent requests carry different
-- sentences.

local threads = {}

function setup(thread)
  thread:set("thread_no", #threads)
  table.insert(threads, thread)
end

local bodies = {}
local counter = 0

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then
      bodies[#bodies + 1] = line
    end
  end
  assert(#bodies > 0, "no request bodies in " .. tostring(args[1]))
  counter = (thread_no or 0) * 7919
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, '
      .. '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"p50": %d, "p90": %d, '
      .. '"p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean
  ))
end
