// Check a statsd configuration before it goes live: parse it exactly as
// statsd 0.9.0 does (lib/config.js evaluates `config = <file>`), then check
// what a daemon needs to start: ports, a Graphite host, loadable backends.
// Usage: node check-config.js CONFIG STATSD_DIR   (exit 1 with one line on error)
'use strict';
const fs = require('fs');
const path = require('path');

const [file, statsdDir] = process.argv.slice(2);
const fail = (message) => {
  console.error(`${file}: ${message}`);
  process.exit(1);
};

let config;
try {
  // eslint-disable-next-line no-eval
  config = eval('config = ' + fs.readFileSync(file, 'utf8'));
} catch (err) {
  fail(`not a statsd configuration: ${err.message}`);
}
if (config === null || typeof config !== 'object' || Array.isArray(config)) {
  fail('the configuration must be an object');
}
for (const key of ['port', 'mgmt_port']) {
  const value = config[key];
  if (!Number.isInteger(value) || value < 1 || value > 65535) {
    fail(`${key} must be a port number, got ${JSON.stringify(value)}`);
  }
}
if (!config.graphiteHost) {
  fail('graphiteHost is not set');
}
for (const backend of config.backends || ['./backends/graphite']) {
  try {
    require.resolve(path.resolve(statsdDir, backend));
  } catch (err) {
    fail(`backend ${backend} is not in ${statsdDir}`);
  }
}
