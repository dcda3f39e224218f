-- wrk script: spread requests over a fixed set of ids, optionally count a response header.
--
--   BENCH_COUNT_HEADER=x-cache \
--   wrk -c 64 -t 2 -d 10s --latency -s bench/wrk/ids.lua http://127.0.0.1:PORT -- /stale/ 100
--
-- args: path prefix and number of ids: requests go to PREFIX0 .. PREFIX<n-1>, round
-- robin, each thread starting elsewhere in the cycle.
-- BENCH_COUNT_HEADER (environment): a response header whose values are counted and
-- printed as one line at the end, e.g. "XCACHE HIT=123 STALE=456". Unset or empty:
-- no response() callback, so wrk does not parse headers into Lua at all (cheaper).
-- It is read at load time because wrk decides whether to parse headers from the
-- main script state, where init() never runs.

local threads = {}
local count_header = os.getenv("BENCH_COUNT_HEADER") or ""

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   local prefix = args[1] or "/"
   nids = tonumber(args[2] or "100")
   counter = (tid or 0) * math.floor(nids / 2 + 1)
   paths = {}
   for i = 0, nids - 1 do
      paths[i] = wrk.format("GET", prefix .. i)
   end
   counts = {}
end

function request()
   counter = counter + 1
   return paths[counter % nids]
end

if count_header ~= "" then
   local lower = string.lower(count_header)
   function response(status, headers, body)
      local value = headers[lower] or headers[count_header] or "none"
      counts[value] = (counts[value] or 0) + 1
   end
end

function done(summary, latency, requests)
   if count_header == "" then
      return
   end
   local total = {}
   for _, thread in ipairs(threads) do
      local c = thread:get("counts")
      if c then
         for k, v in pairs(c) do total[k] = (total[k] or 0) + v end
      end
   end
   local parts = {}
   for k, v in pairs(total) do table.insert(parts, k .. "=" .. v) end
   table.sort(parts)
   io.write("XCACHE " .. table.concat(parts, " ") .. "\n")
end
