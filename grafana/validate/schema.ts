/**
 * arbstream's dashboards as TypeScript types built only from Grafana 11.3's published schema
 * (`@grafana/schema`: the dashboard kind and each panel plugin's generated options and field
 * config), so that `tsc` rejects what Grafana's schema rejects: unknown or misspelt keys
 * (excess-property checks on the object literals), wrong types, missing required options.
 *
 * Two additions, both from Grafana's own sources, because `@grafana/schema` does not publish
 * them: the InfluxDB query model (`InfluxQuery`, public/app/plugins/datasource/influxdb/
 * types.ts in grafana/grafana v11.3.0) and the per-panel-type union (Grafana keys options by
 * the panel's `type`; the kind leaves `options` as `Record<string, unknown>`).
 */
import type * as S from '@grafana/schema';
import type * as BarChart from '@grafana/schema/dist/esm/raw/composable/barchart/panelcfg/x/BarChartPanelCfg_types.gen';
import type * as Histogram from '@grafana/schema/dist/esm/raw/composable/histogram/panelcfg/x/HistogramPanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as StateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as XYChart from '@grafana/schema/dist/esm/raw/composable/xychart/panelcfg/x/XYChartPanelCfg_types.gen';

/** String enums become the union of their values, so JSON string literals type-check. */
type Plain<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<Plain<U>>
      : T extends object
        ? { [K in keyof T]: Plain<T[K]> }
        : T;

/** InfluxDB query model of Grafana's InfluxDB data source (InfluxQL subset used here). */
export interface InfluxQuery {
  refId: string;
  datasource: { type: 'influxdb'; uid: string };
  hide?: boolean;
  query: string;
  rawQuery: true;
  resultFormat: 'time_series' | 'table' | 'logs';
  alias?: string;
  policy?: string;
  measurement?: string;
  orderByTime?: 'ASC' | 'DESC';
  limit?: string | number;
  slimit?: string | number;
  tz?: string;
}

type DefaultsWith<C> = Omit<Plain<S.FieldConfig>, 'custom'> & { custom?: Plain<C> };

type TypedPanel<T extends string, O, C> = Omit<Plain<S.Panel>, 'type' | 'options' | 'fieldConfig' | 'targets' | 'datasource'> & {
  type: T;
  datasource: { type: 'influxdb'; uid: string };
  options: Plain<O>;
  fieldConfig: { defaults: DefaultsWith<C>; overrides: Plain<S.FieldConfigSource['overrides']> };
  targets: InfluxQuery[];
};

export type ArbPanel =
  | TypedPanel<'stat', Stat.Options, Record<string, never>>
  | TypedPanel<'table', Table.Options, Table.FieldConfig>
  | TypedPanel<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>
  | TypedPanel<'histogram', Histogram.Options, Histogram.FieldConfig>
  | TypedPanel<'xychart', XYChart.Options, XYChart.FieldConfig>
  | TypedPanel<'barchart', BarChart.Options, BarChart.FieldConfig>
  | TypedPanel<'state-timeline', StateTimeline.Options, StateTimeline.FieldConfig>;

export type ArbRow = Omit<Plain<S.RowPanel>, 'panels' | 'type'> & { type: 'row'; panels: ArbPanel[] };

type Variable = Omit<Plain<S.VariableModel>, 'datasource'> & {
  datasource?: { type: 'influxdb'; uid: string };
  definition?: string;
};

export type ArbDashboard = Omit<Plain<S.Dashboard>, 'panels' | 'templating' | 'uid' | 'title'> & {
  uid: string;
  title: string;
  panels: Array<ArbPanel | ArbRow>;
  templating: { list: Variable[] };
};
