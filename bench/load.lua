-- wrk script of `make bench`: POST one SQL statement per request, with a random key, and
-- print the run's figures as one JSON line that bench/load_bench.py reads.
--
-- Environment: BENCH_BODY is the JSON request body with {KEY} where the key goes (and
-- {KEY2} for the key + BENCH_SPAN); BENCH_KEYS the largest key; BENCH_TOKEN a bearer token
-- (empty for the passthrough, which has no authentication).
local body = os.getenv("BENCH_BODY")
local keys = tonumber(os.getenv("BENCH_KEYS"))
local span = tonumber(os.getenv("BENCH_SPAN") or "0")
local token = os.getenv("BENCH_TOKEN") or ""

wrk.method = "POST"
wrk.path = "/v1/query"
wrk.headers["Content-Type"] = "application/json"
if token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function request()
  local key = math.random(1, keys)
  local text = body:gsub("{KEY2}", tostring(key + span)):gsub("{KEY}", tostring(key))
  return wrk.format(nil, nil, nil, text)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"non_2xx":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p95_us":%d,' ..
    '"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean,
    latency.max))
end
