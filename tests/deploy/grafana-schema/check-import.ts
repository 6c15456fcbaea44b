// The plain check: the dashboard file, imported as JSON, is assignable to Grafana's Dashboard.
// tsc widens JSON strings to `string`, so this catches structure (missing required fields, wrong
// value kinds) but not enum values or misspelled keys; dashboard.generated.ts does those.
import type { Dashboard } from '@grafana/schema';
import type { Wire } from './wire';
import dashboard from '../../../deploy/grafana/dashboards/balloon.json';

type Widened<T> = T extends string ? string : T extends Array<infer U> ? Array<Widened<U>>
  : T extends object ? { [K in keyof T]: Widened<T[K]> } : T;

export const imported: Widened<Wire<Dashboard>> = dashboard;
