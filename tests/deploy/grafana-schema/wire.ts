// What a Grafana type looks like once written as JSON: string enums (FieldColorModeId,
// ThresholdsMode, ...) become the union of their string values, since a JSON file holds
// "palette-classic", never FieldColorModeId.PaletteClassic. Everything else is kept as is,
// so numeric enums, literal unions, required fields and unknown keys are still checked.
export type Wire<T> = T extends string
  ? `${T}`
  : T extends Array<infer U>
    ? Array<Wire<U>>
    : T extends object
      ? { [K in keyof T]: Wire<T[K]> }
      : T;
